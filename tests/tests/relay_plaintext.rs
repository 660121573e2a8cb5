//! The relay never stores or logs plaintext.
//!
//! Two devices set up a real session (X3DH from prekeys fetched through the
//! relay, then the double ratchet from `hush-crypto`) and exchange messages
//! carrying unique marker strings. The relay runs with `RUST_LOG=trace`.
//! After a clean shutdown, neither any file in its data directory (the redb
//! database, the envelope segment files, certificates) nor its captured
//! output contains a marker — raw,
//! hex-encoded, or as a Debug-printed byte list — while the recipients did
//! decrypt every marker, proving the markers really went through the relay.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_crypto::{
    DevicePublic, PrekeyBundle as CryptoBundle, PrekeySecrets, RatchetHeader, Session, SessionInit,
    initiate, os_rng, respond,
};
use hush_protocol::{
    ConversationId, DeviceId, DeviceRegistration, Envelope, EnvelopeHeader, MessageId,
    OneTimePrekey, SessionInitHeader, SignedPrekey, UserKey,
};
use hush_tests::{DeviceIdentity, RelayProcess, SeededRng, TestDevice, conversation};
use std::path::Path;

/// A device whose keys all come from `hush-crypto`: the user identity
/// certifies the device, the device identity authenticates the connection
/// (plain Ed25519 over the protocol's prefixed challenge layout) and runs the
/// session.
struct Peer {
    /// Only the device id is used: the harness's own keys are not.
    relay_id: DeviceIdentity,
    user: hush_crypto::UserIdentity,
    crypto: hush_crypto::DeviceIdentity,
}

impl Peer {
    fn new(seed: u64) -> Peer {
        let mut rng = os_rng();
        Peer {
            relay_id: DeviceIdentity::from_seed(seed),
            user: hush_crypto::UserIdentity::generate(&mut rng),
            crypto: hush_crypto::DeviceIdentity::generate(&mut rng),
        }
    }

    fn device(&self) -> DeviceId {
        self.relay_id.device()
    }

    async fn register(&self, target: hush_tests::RelayTarget) -> TestDevice {
        let public = self.crypto.public();
        let mut registration = DeviceRegistration {
            device: self.device(),
            user: UserKey(self.user.public()),
            signing_key: public.signing,
            agreement_key: public.agreement,
            user_signature: [0; 64],
        };
        registration.user_signature = self.user.sign_prefixed(&registration.certificate_bytes());
        let mut dev = TestDevice::connect(&self.relay_id, target).await.unwrap();
        dev.register_with(registration, |m| self.crypto.sign_prefixed(m))
            .await
            .expect("registration with hush-crypto keys");
        dev
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seal `plaintext` into an envelope whose header bytes are the AEAD's
/// associated data.
fn seal(
    session: &mut Session,
    from: DeviceId,
    to: DeviceId,
    conv: ConversationId,
    sender_seq: u64,
    plaintext: &[u8],
) -> Envelope {
    let mut rng = os_rng();
    let session_init = session.needs_init_header().map(|i| SessionInitHeader {
        initiator_identity: i.initiator_identity,
        ephemeral: i.ephemeral,
        signed_prekey_id: i.signed_prekey_id,
        one_time_prekey_id: i.one_time_prekey_id,
    });
    let mut random = [0u8; 10];
    SeededRng::new(sender_seq ^ now_ms()).fill(&mut random);
    let mut header = EnvelopeHeader {
        message_id: MessageId::new(now_ms(), random),
        sender_device: from,
        recipient_device: to,
        conversation_id: conv,
        sender_seq,
        sent_at_ms: now_ms(),
        ratchet: Vec::new(),
        session_init,
        important: false,
    };
    let template = header.clone();
    let (ratchet, ciphertext) = session
        .seal(&mut rng, now_ms(), plaintext, |rh| {
            let mut h = template.clone();
            h.ratchet = rh.to_bytes().to_vec();
            h.to_bytes().unwrap_or_default()
        })
        .expect("seal");
    header.ratchet = ratchet.to_bytes().to_vec();
    Envelope { header, ciphertext }
}

fn open(session: &mut Session, envelope: &Envelope) -> Vec<u8> {
    let header = RatchetHeader::from_bytes(&envelope.header.ratchet).expect("ratchet header");
    let ad = envelope.associated_data().expect("header bytes");
    session
        .open(&mut os_rng(), now_ms(), &header, &ad, &envelope.ciphertext)
        .expect("recipient decrypts")
}

/// Every way the relay could plausibly have written `marker`.
fn encodings(marker: &[u8]) -> Vec<Vec<u8>> {
    let debug_list = format!("{:?}", &marker[..12]);
    let debug_list = debug_list.trim_end_matches(']').to_string();
    vec![
        marker.to_vec(),
        hex::encode(marker).into_bytes(),
        hex::encode_upper(marker).into_bytes(),
        debug_list.into_bytes(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read data dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else if path.is_file() {
            out.push(path);
        }
    }
}

#[tokio::test]
async fn relay_stores_and_logs_no_plaintext() {
    let mut relay =
        RelayProcess::spawn_temp_with_env(&["--send-rate", "0"], &[("RUST_LOG", "trace")])
            .await
            .expect("relay starts");
    let t = relay.target();
    let tag = hex::encode(SeededRng::new(now_ms()).bytes::<8>());
    let markers: Vec<Vec<u8>> = (0..6)
        .map(|i| format!("HUSH-PLAINTEXT-MARKER-{tag}-{i:02}-the quick brown fox").into_bytes())
        .collect();

    let alice = Peer::new(1);
    let bob = Peer::new(2);
    let mut a = alice.register(t).await;
    let mut b = bob.register(t).await;

    // Bob publishes his prekeys through the relay.
    let mut rng = os_rng();
    let mut bob_prekeys = PrekeySecrets::new(&bob.crypto, &mut rng, now_ms());
    let otks = bob_prekeys.generate_one_time_prekeys(&mut rng, 2).unwrap();
    let (spk_id, spk_pub, spk_sig) = bob_prekeys.signed_prekey();
    let published = b
        .publish_prekeys(
            SignedPrekey {
                id: spk_id,
                public: spk_pub,
                signature: spk_sig,
            },
            otks.iter()
                .map(|(id, public)| OneTimePrekey {
                    id: *id,
                    public: *public,
                })
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(published, 2);

    // Alice fetches them; the bundle (keys from Bob's registration, prekeys
    // as published) verifies under hush-crypto.
    let fetched = a.fetch_prekeys(bob.device()).await.unwrap();
    assert_eq!(fetched.user, UserKey(bob.user.public()));
    let bundle = CryptoBundle {
        identity: DevicePublic {
            signing: fetched.signing_key,
            agreement: fetched.agreement_key,
        },
        signed_prekey_id: fetched.signed_prekey.id,
        signed_prekey: fetched.signed_prekey.public,
        signed_prekey_sig: fetched.signed_prekey.signature,
        one_time_prekey: fetched.one_time_prekey.map(|k| (k.id, k.public)),
    };
    let (mut alice_session, init) = initiate(&alice.crypto, &bundle, &mut rng).unwrap();
    assert!(init.one_time_prekey_id.is_some());

    let conv = conversation(42);
    let to_bob: Vec<_> = markers[..5]
        .iter()
        .enumerate()
        .map(|(i, m)| {
            seal(
                &mut alice_session,
                alice.device(),
                bob.device(),
                conv,
                i as u64 + 1,
                m,
            )
        })
        .collect();
    for o in a.send(to_bob).await.unwrap() {
        assert!(hush_tests::stored(&o).is_some(), "{o:?}");
    }

    // Bob pulls (without acknowledging: the envelopes stay in the database),
    // runs his half of X3DH from the first envelope, and decrypts all.
    let inbox = b.read_inbox(0).await.unwrap();
    assert_eq!(inbox.len(), 5);
    let first = &inbox[0].envelope.header;
    let init_header = first
        .session_init
        .clone()
        .expect("first envelope carries the init");
    let init = SessionInit {
        initiator_identity: init_header.initiator_identity,
        ephemeral: init_header.ephemeral,
        signed_prekey_id: init_header.signed_prekey_id,
        one_time_prekey_id: init_header.one_time_prekey_id,
    };
    let alice_public: DevicePublic = alice.crypto.public();
    let mut bob_session = respond(&bob.crypto, &mut bob_prekeys, &init, &alice_public).unwrap();
    for (d, marker) in inbox.iter().zip(&markers) {
        assert_eq!(&open(&mut bob_session, &d.envelope), marker);
    }

    // Bob answers; Alice decrypts.
    let reply = seal(
        &mut bob_session,
        bob.device(),
        alice.device(),
        conv,
        1,
        &markers[5],
    );
    assert!(hush_tests::stored(&b.send_one(reply).await.unwrap()).is_some());
    let got = a.read_inbox(0).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(open(&mut alice_session, &got[0].envelope), markers[5]);

    // Clean shutdown, then search every byte the relay left behind.
    drop((a, b));
    let status = relay.terminate().await.expect("SIGTERM");
    assert!(status.success(), "{status}");

    let mut files = Vec::new();
    files_under(relay.data_dir(), &mut files);
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "redb")),
        "the data dir holds a redb database: {files:?}"
    );
    let is_segment = |f: &std::path::PathBuf| f.extension().is_some_and(|e| e == "seg");
    assert!(
        files.iter().any(is_segment),
        "the data dir holds envelope segment files: {files:?}"
    );
    let log = relay.log_bytes().unwrap();
    assert!(
        log.windows(5).filter(|w| w == b"TRACE").count() > 0,
        "the relay really logged at trace level"
    );
    let mut stored_bytes = 0;
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        stored_bytes += bytes.len();
        for m in &markers {
            for enc in encodings(m) {
                assert!(
                    !contains(&bytes, &enc),
                    "{} contains a plaintext marker",
                    file.display()
                );
            }
        }
    }
    for m in &markers {
        for enc in encodings(m) {
            assert!(
                !contains(&log, &enc),
                "the relay log contains a plaintext marker"
            );
        }
    }
    // The check is only meaningful if the ciphertext is in there: the
    // envelopes Bob never acknowledged are still stored.
    assert!(stored_bytes > 0);
    // The envelopes live in the segment files (the database holds only
    // their index), and those were searched too.
    let ct = &inbox[0].envelope.ciphertext;
    assert!(
        files
            .iter()
            .filter(|f| is_segment(f))
            .any(|f| contains(&std::fs::read(f).unwrap(), &ct[..32.min(ct.len())])),
        "the stored ciphertext was found in a segment file, so the search looked in the right place"
    );
}
