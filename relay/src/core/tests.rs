//! Unit tests of the protocol logic over the in-memory store.

use super::*;
use crate::store::StoreLimits;
use crate::store::memory::MemoryStore;
use ed25519_dalek::{Signer, SigningKey};
use hush_protocol::{
    BlobId, ConversationId, DeviceEntry, DeviceList, DeviceRegistration, EnvelopeHeader,
    OneTimePrekey, SignedPrekey, UserKey,
};

const NOW: u64 = 1_800_000_000_000;

struct Device {
    id: DeviceId,
    user: SigningKey,
    key: SigningKey,
}

impl Device {
    fn new(n: u8, user_seed: u8) -> Device {
        Device {
            id: DeviceId([n; 16]),
            user: SigningKey::from_bytes(&[user_seed; 32]),
            key: SigningKey::from_bytes(&[n.wrapping_add(100); 32]),
        }
    }

    fn user_key(&self) -> UserKey {
        UserKey(self.user.verifying_key().to_bytes())
    }

    fn registration(&self) -> DeviceRegistration {
        let mut r = DeviceRegistration {
            device: self.id,
            user: self.user_key(),
            signing_key: self.key.verifying_key().to_bytes(),
            agreement_key: [9; 32],
            user_signature: [0; 64],
        };
        r.user_signature = self.user.sign(&r.certificate_bytes()).to_bytes();
        r
    }

    /// This device's entry in a list of `user`, with its membership proof.
    fn entry_for(&self, user: &UserKey) -> DeviceEntry {
        let mut e = DeviceEntry {
            device: self.id,
            signing_key: self.key.verifying_key().to_bytes(),
            agreement_key: [9; 32],
            membership_signature: [0; 64],
        };
        e.membership_signature = self.key.sign(&e.membership_bytes(user)).to_bytes();
        e
    }

    /// A list of this device's user naming `devices`, signed by the user.
    fn list_of(&self, version: u64, devices: Vec<DeviceEntry>) -> SignedDeviceList {
        let mut list = SignedDeviceList {
            list: DeviceList {
                user: self.user_key(),
                version,
                devices,
            },
            signature: [0; 64],
        };
        list.signature = self
            .user
            .sign(&list.list.signing_bytes().unwrap())
            .to_bytes();
        list
    }

    fn sign_challenge(&self, challenge: &[u8; 32]) -> [u8; 64] {
        self.key
            .sign(&auth_challenge_bytes(challenge, &self.id))
            .to_bytes()
    }
}

fn core_with(config: CoreConfig) -> RelayCore<MemoryStore> {
    RelayCore::new(
        Arc::new(MemoryStore::new(StoreLimits::default())),
        config,
        Arc::new(Metrics::new()),
    )
}

fn default_config() -> CoreConfig {
    CoreConfig {
        max_envelope: hush_protocol::limits::MAX_ENVELOPE_LEN,
        retention_ms: 7 * 86_400_000,
        retention_important_ms: 30 * 86_400_000,
        send_rate: 0,
        send_burst: 32,
        push_window: DEFAULT_PUSH_WINDOW,
        blobs: crate::store::BlobLimits::default(),
        stale_after_ms: crate::core::DEFAULT_STALE_AFTER_MS,
    }
}

fn req(request_id: u32, request: Request) -> ClientFrame {
    ClientFrame {
        request_id,
        request,
    }
}

/// The answer's frame, as the device decodes it from the wire: the first
/// action, or the second after the claim of a device just authenticated.
fn frame(actions: &[Action]) -> ServerFrame {
    let skip = usize::from(matches!(actions.first(), Some(Action::Authenticated(_))));
    match actions.get(skip) {
        Some(Action::Send(f)) => {
            hush_protocol::decode_server_frame(&f.encode().expect("encodes")).expect("decodes")
        }
        other => panic!("expected a frame first, got {other:?}"),
    }
}

fn error_code(actions: &[Action]) -> ErrorCode {
    match frame(actions) {
        ServerFrame::Error { error, .. } => error.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn challenge_of(actions: &[Action]) -> [u8; 32] {
    match frame(actions) {
        ServerFrame::Response {
            response: Response::Challenge { challenge },
            ..
        } => challenge,
        other => panic!("expected a challenge, got {other:?}"),
    }
}

/// Register `d` on a fresh session and return the authenticated session.
fn register(core: &RelayCore<MemoryStore>, d: &Device, challenge: [u8; 32]) -> Session {
    let mut s = core.new_session(NOW);
    let c = challenge_of(&core.handle(
        &mut s,
        req(1, Request::Hello { device: d.id }),
        NOW,
        challenge,
    ));
    let actions = core.handle(
        &mut s,
        req(
            2,
            Request::Register {
                registration: d.registration(),
                signature: d.sign_challenge(&c),
            },
        ),
        NOW,
        [0; 32],
    );
    assert!(
        matches!(
            frame(&actions),
            ServerFrame::Response {
                response: Response::Authenticated(_),
                ..
            }
        ),
        "{actions:?}"
    );
    assert!(actions.contains(&Action::Authenticated(d.id)));
    s
}

fn envelope(from: &Device, to: &Device, seq: u64, body: usize) -> Envelope {
    Envelope {
        header: EnvelopeHeader {
            message_id: MessageId::new(NOW, [seq as u8; 10]),
            sender_device: from.id,
            recipient_device: to.id,
            conversation_id: ConversationId([3; 16]),
            sender_seq: seq,
            sent_at_ms: NOW,
            ratchet: vec![1; 40],
            session_init: None,
            important: false,
        },
        ciphertext: vec![0xAB; body.max(16)],
    }
}

/// Handle a Send and commit it directly (what the writer does).
fn send(
    core: &RelayCore<MemoryStore>,
    s: &mut Session,
    envelopes: Vec<Envelope>,
    now: u64,
) -> Vec<SendOutcome> {
    let mut actions = core.handle(s, req(7, Request::Send { envelopes }), now, [0; 32]);
    assert_eq!(actions.len(), 1);
    let reply = match actions.remove(0) {
        Action::Commit(p) => core.finish_send(p.ticket, core.store().commit(&p.envelopes)),
        Action::Send(f) => f.to_frame().expect("decodes"),
        other => panic!("unexpected {other:?}"),
    };
    match reply {
        ServerFrame::Response {
            request_id: 7,
            response: Response::Sent { outcomes },
        } => outcomes,
        other => panic!("expected Sent, got {other:?}"),
    }
}

fn pull(
    core: &RelayCore<MemoryStore>,
    s: &mut Session,
    after: u64,
    ack: u64,
) -> (Page, Vec<Action>) {
    let actions = core.handle(
        s,
        req(
            9,
            Request::Pull {
                after,
                limit: 200,
                ack,
            },
        ),
        NOW,
        [0; 32],
    );
    match frame(&actions) {
        ServerFrame::Response {
            response: Response::Page(p),
            ..
        } => (p.clone(), actions),
        other => panic!("expected a page, got {other:?}"),
    }
}

fn pushed_seqs(actions: &[Action]) -> Vec<u64> {
    seqs_sent(actions, false)
}

/// The seqs of the envelopes pushed (`early`: pushed early) by `actions`.
fn seqs_sent(actions: &[Action], early: bool) -> Vec<u64> {
    actions
        .iter()
        .flat_map(|a| match a {
            Action::Send(Outbound::Push(envelopes)) if !early => {
                envelopes.iter().map(|d| d.seq()).collect::<Vec<_>>()
            }
            Action::Send(Outbound::EarlyPush(envelopes)) if early => {
                envelopes.iter().map(|d| d.seq()).collect::<Vec<_>>()
            }
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn register_then_auth_and_bad_signature_consumes_the_challenge() {
    let core = core_with(default_config());
    let alice = Device::new(1, 50);
    register(&core, &alice, [11; 32]);

    let mut s = core.new_session(NOW);
    // A wrong signature fails and uses up the challenge.
    let c = challenge_of(&core.handle(
        &mut s,
        req(1, Request::Hello { device: alice.id }),
        NOW,
        [12; 32],
    ));
    let mut bad = alice.sign_challenge(&c);
    bad[0] ^= 1;
    let a = core.handle(
        &mut s,
        req(2, Request::Auth { signature: bad }),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::BadAuth);
    let good = alice.sign_challenge(&c);
    let a = core.handle(
        &mut s,
        req(3, Request::Auth { signature: good }),
        NOW,
        [0; 32],
    );
    assert_eq!(
        error_code(&a),
        ErrorCode::BadAuth,
        "challenge is single-use"
    );
    assert_eq!(s.device(), None);

    // A fresh Hello gives a fresh challenge and the connection may retry.
    let c2 = challenge_of(&core.handle(
        &mut s,
        req(4, Request::Hello { device: alice.id }),
        NOW,
        [13; 32],
    ));
    assert_ne!(c, c2);
    let a = core.handle(
        &mut s,
        req(
            5,
            Request::Auth {
                signature: alice.sign_challenge(&c2),
            },
        ),
        NOW,
        [0; 32],
    );
    match frame(&a) {
        ServerFrame::Response {
            request_id: 5,
            response: Response::Authenticated(ok),
        } => {
            assert_eq!(ok.device, alice.id);
            assert_eq!(ok.relay_time_ms, NOW);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.device(), Some(alice.id));
    assert_eq!(core.metrics().refusals(ErrorCode::BadAuth), 2);
}

#[test]
fn signature_for_one_challenge_fails_on_another_session() {
    let core = core_with(default_config());
    let alice = Device::new(1, 50);
    register(&core, &alice, [11; 32]);
    let mut s1 = core.new_session(NOW);
    let c1 = challenge_of(&core.handle(
        &mut s1,
        req(1, Request::Hello { device: alice.id }),
        NOW,
        [21; 32],
    ));
    let captured = alice.sign_challenge(&c1);
    let mut s2 = core.new_session(NOW);
    let _ = challenge_of(&core.handle(
        &mut s2,
        req(1, Request::Hello { device: alice.id }),
        NOW,
        [22; 32],
    ));
    let a = core.handle(
        &mut s2,
        req(
            2,
            Request::Auth {
                signature: captured,
            },
        ),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::BadAuth);
}

#[test]
fn unknown_device_and_unauthenticated_requests_are_refused() {
    let core = core_with(default_config());
    let ghost = Device::new(9, 90);
    let mut s = core.new_session(NOW);
    for r in [
        Request::Pull {
            after: 0,
            limit: 10,
            ack: 0,
        },
        Request::Ack { up_to: 1 },
        Request::FetchPrekeys { device: ghost.id },
        Request::Send { envelopes: vec![] },
    ] {
        assert_eq!(
            error_code(&core.handle(&mut s, req(1, r), NOW, [0; 32])),
            ErrorCode::NotAuthenticated
        );
    }
    assert!(matches!(
        frame(&core.handle(&mut s, req(1, Request::Ping), NOW, [0; 32])),
        ServerFrame::Response {
            response: Response::Pong { relay_time_ms: NOW },
            ..
        }
    ));
    let c = challenge_of(&core.handle(
        &mut s,
        req(2, Request::Hello { device: ghost.id }),
        NOW,
        [5; 32],
    ));
    let a = core.handle(
        &mut s,
        req(
            3,
            Request::Auth {
                signature: ghost.sign_challenge(&c),
            },
        ),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::UnknownDevice);
}

#[test]
fn registration_needs_a_valid_certificate_and_matching_hello() {
    let core = core_with(default_config());
    let alice = Device::new(1, 50);
    let mut s = core.new_session(NOW);
    let c = challenge_of(&core.handle(
        &mut s,
        req(1, Request::Hello { device: alice.id }),
        NOW,
        [1; 32],
    ));
    let mut reg = alice.registration();
    reg.user_signature[5] ^= 1;
    let a = core.handle(
        &mut s,
        req(
            2,
            Request::Register {
                registration: reg,
                signature: alice.sign_challenge(&c),
            },
        ),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::BadAuth);
    // Hello for another device than the registration.
    let other = Device::new(2, 50);
    let c = challenge_of(&core.handle(
        &mut s,
        req(3, Request::Hello { device: other.id }),
        NOW,
        [2; 32],
    ));
    let a = core.handle(
        &mut s,
        req(
            4,
            Request::Register {
                registration: alice.registration(),
                signature: alice.sign_challenge(&c),
            },
        ),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::BadAuth);
    assert_eq!(
        core.store().device(&alice.id).unwrap(),
        None,
        "nothing registered"
    );
}

#[test]
fn send_refusals_are_per_envelope_and_write_nothing() {
    let mut config = default_config();
    config.max_envelope = 1000;
    let core = core_with(config);
    let alice = Device::new(1, 50);
    let bob = Device::new(2, 60);
    let ghost = Device::new(3, 70);
    let mut sa = register(&core, &alice, [1; 32]);
    register(&core, &bob, [2; 32]);

    let outcomes = send(
        &core,
        &mut sa,
        vec![
            envelope(&alice, &bob, 1, 100),
            envelope(&bob, &alice, 2, 100),   // forged sender
            envelope(&alice, &bob, 3, 5000),  // too large
            envelope(&alice, &ghost, 4, 100), // unknown recipient
            envelope(&alice, &bob, 5, 100),
        ],
        NOW,
    );
    let codes: Vec<Option<ErrorCode>> = outcomes
        .iter()
        .map(|o| match o {
            SendOutcome::Stored { .. } => None,
            SendOutcome::Refused { error, .. } => Some(error.code),
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            None,
            Some(ErrorCode::Forbidden),
            Some(ErrorCode::TooLarge),
            Some(ErrorCode::UnknownDevice),
            None
        ]
    );
    let state = core.store().inbox_state(&bob.id).unwrap();
    assert_eq!(
        (state.head, state.depth),
        (2, 2),
        "only the two valid envelopes were written"
    );
    assert_eq!(core.store().inbox_state(&alice.id).unwrap().depth, 0);

    // A retry is a duplicate with the original seq.
    let again = send(&core, &mut sa, vec![envelope(&alice, &bob, 1, 100)], NOW);
    assert!(
        matches!(
            again[0],
            SendOutcome::Stored {
                seq: 1,
                duplicate: true,
                ..
            }
        ),
        "{again:?}"
    );
    assert_eq!(core.store().inbox_state(&bob.id).unwrap().depth, 2);
    assert_eq!(Metrics::get(&core.metrics().duplicate_sends_total), 1);
}

#[test]
fn rate_limit_refuses_with_retry_after_and_refills_with_time() {
    let mut config = default_config();
    config.send_rate = 10;
    config.send_burst = 3;
    let core = core_with(config);
    let alice = Device::new(1, 50);
    let bob = Device::new(2, 60);
    let mut sa = register(&core, &alice, [1; 32]);
    register(&core, &bob, [2; 32]);
    let batch: Vec<Envelope> = (1..=5).map(|i| envelope(&alice, &bob, i, 50)).collect();
    let outcomes = send(&core, &mut sa, batch, NOW);
    let stored = outcomes
        .iter()
        .filter(|o| matches!(o, SendOutcome::Stored { .. }))
        .count();
    assert_eq!(stored, 3);
    match &outcomes[3] {
        SendOutcome::Refused { error, .. } => {
            assert_eq!(error.code, ErrorCode::RateLimited);
            assert_eq!(
                error.retry_after_ms,
                Some(100),
                "10/s: one token per 100 ms"
            );
        }
        other => panic!("{other:?}"),
    }
    // 100 ms later exactly one more fits.
    let later = send(
        &core,
        &mut sa,
        vec![envelope(&alice, &bob, 6, 50), envelope(&alice, &bob, 7, 50)],
        NOW + 100,
    );
    assert!(matches!(later[0], SendOutcome::Stored { .. }));
    assert!(matches!(later[1], SendOutcome::Refused { .. }));
}

#[test]
fn pull_acks_pages_goes_live_and_pushes_contiguously_within_the_window() {
    let mut config = default_config();
    config.push_window = 3;
    let core = core_with(config);
    let alice = Device::new(1, 50);
    let bob = Device::new(2, 60);
    let mut sa = register(&core, &alice, [1; 32]);
    let mut sb = register(&core, &bob, [2; 32]);
    send(
        &core,
        &mut sa,
        (1..=2).map(|i| envelope(&alice, &bob, i, 50)).collect(),
        NOW,
    );

    let (page, actions) = pull(&core, &mut sb, 0, 0);
    assert_eq!(
        page.envelopes.iter().map(|d| d.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(page.remaining, 0);
    assert!(actions.contains(&Action::Live(bob.id)));
    assert!(sb.is_live());

    // New envelopes are pushed after seq 2, up to the window (3 unacked).
    send(
        &core,
        &mut sa,
        (3..=6).map(|i| envelope(&alice, &bob, i, 50)).collect(),
        NOW,
    );
    assert_eq!(pushed_seqs(&core.pump(&mut sb)), vec![3]);
    assert!(core.pump(&mut sb).is_empty(), "window full");

    // A cumulative ack opens the window and pushes the rest.
    let a = core.handle(&mut sb, req(11, Request::Ack { up_to: 3 }), NOW, [0; 32]);
    assert!(matches!(
        frame(&a),
        ServerFrame::Response {
            response: Response::Acked { up_to: 3 },
            ..
        }
    ));
    assert_eq!(pushed_seqs(&a), vec![4, 5, 6]);
    assert_eq!(
        core.store().inbox_state(&bob.id).unwrap().depth,
        3,
        "acked ones deleted"
    );

    // Merged ack on the next pull deletes the rest; a re-pull starts after it.
    let (page, _) = pull(&core, &mut sb, 6, 6);
    assert!(page.envelopes.is_empty());
    assert_eq!(core.store().inbox_state(&bob.id).unwrap().depth, 0);
}

/// Envelopes a commit just stored are pushed from memory exactly as `pump`
/// would push them from the store (same seqs, same window), and anything
/// `pump` would treat otherwise is left to it.
#[test]
fn fresh_envelopes_are_pushed_as_the_store_would_push_them_or_not_at_all() {
    let mut config = default_config();
    config.push_window = 3;
    let core = core_with(config);
    let alice = Device::new(1, 50);
    let bob = Device::new(2, 60);
    let mut sa = register(&core, &alice, [1; 32]);
    let mut sb = register(&core, &bob, [2; 32]);
    let stored = |after: u64, n: usize| stored_raw(&core, &bob.id, after, n);
    send(
        &core,
        &mut sa,
        (1..=2).map(|i| envelope(&alice, &bob, i, 50)).collect(),
        NOW,
    );
    // Not live yet: nothing from memory.
    assert!(core.push_fresh(&mut sb, stored(0, 1), false).is_none());
    let (page, _) = pull(&core, &mut sb, 0, 0);
    assert_eq!(page.envelopes.len(), 2);
    send(
        &core,
        &mut sa,
        (3..=6).map(|i| envelope(&alice, &bob, i, 50)).collect(),
        NOW,
    );
    // Two unacknowledged already: room for one.
    assert!(
        core.push_fresh(&mut sb, stored(2, 2), false).is_none(),
        "past the window"
    );
    assert!(
        core.push_fresh(&mut sb, stored(3, 1), false).is_none(),
        "a gap before it"
    );
    assert!(core.push_fresh(&mut sb, Vec::new(), false).is_none());
    let a = core.push_fresh(&mut sb, stored(2, 1), false).unwrap();
    assert_eq!(pushed_seqs(&a), vec![3]);
    assert_eq!(sb.delivered(), 3);
    assert!(
        core.pump(&mut sb).is_empty(),
        "window full, as after a pump"
    );
    let a = core.handle(&mut sb, req(11, Request::Ack { up_to: 3 }), NOW, [0; 32]);
    assert_eq!(pushed_seqs(&a), vec![4, 5, 6]);
}

/// Up to `n` envelopes of `device`'s inbox after `after`, as a commit hands
/// them to the hub.
fn stored_raw(
    core: &RelayCore<MemoryStore>,
    device: &DeviceId,
    after: u64,
    n: usize,
) -> Vec<RawDelivered> {
    core.store()
        .pull(device, after, n, MAX_PAGE_BYTES)
        .unwrap()
        .envelopes
        .into_iter()
        .map(|s| RawDelivered::new(s.seq, s.bytes).unwrap())
        .collect()
}

fn early_seqs(actions: &[Action]) -> Vec<u64> {
    seqs_sent(actions, true)
}

fn durable_through(action: Option<Action>) -> Option<u64> {
    match action {
        Some(Action::Send(Outbound::Frame(ServerFrame::Durable { through }))) => Some(through),
        _ => None,
    }
}

/// Early pushes go only to a session that asked; `Durable` never claims
/// more than was pushed early on the connection, nor more than is durable;
/// a pull starts the count again from its page.
#[test]
fn early_pushes_only_when_asked_and_durable_notices_never_claim_more_than_was_pushed() {
    let core = core_with(default_config());
    let alice = Device::new(1, 50);
    let bob = Device::new(2, 60);
    let mut sa = register(&core, &alice, [1; 32]);
    let mut sb = register(&core, &bob, [2; 32]);
    let written = |after: u64, n: usize| stored_raw(&core, &bob.id, after, n);
    let (page, _) = pull(&core, &mut sb, 0, 0);
    assert!(page.envelopes.is_empty());
    send(
        &core,
        &mut sa,
        (1..=3).map(|i| envelope(&alice, &bob, i, 50)).collect(),
        NOW,
    );
    // Not asked for: no early push, and no notice.
    assert!(core.push_fresh(&mut sb, written(0, 1), true).is_none());
    assert_eq!(durable_through(core.durable_notice(&mut sb, 3)), None);
    let a = core.handle(&mut sb, req(20, Request::EarlyPushes), NOW, [0; 32]);
    assert!(matches!(
        frame(&a),
        ServerFrame::Response {
            response: Response::EarlyPushes,
            ..
        }
    ));
    assert!(a.contains(&Action::EarlyPushes(bob.id)));
    assert!(sb.wants_early());
    let a = core.push_fresh(&mut sb, written(0, 2), true).unwrap();
    assert_eq!(early_seqs(&a), vec![1, 2]);
    assert!(sb.pushed_early_through(2));
    assert!(!sb.pushed_early_through(3));
    // Durable up to 1 only: the notice says 1.
    assert_eq!(durable_through(core.durable_notice(&mut sb, 1)), Some(1));
    assert_eq!(
        durable_through(core.durable_notice(&mut sb, 1)),
        None,
        "once"
    );
    // The head is past what was pushed: capped at 2.
    assert_eq!(durable_through(core.durable_notice(&mut sb, 3)), Some(2));
    // A pull starts again from its page, which is all durable.
    let (page, _) = pull(&core, &mut sb, 0, 0);
    assert_eq!(seqs(&page), vec![1, 2, 3]);
    assert!(!sb.pushed_early_through(3));
    assert_eq!(durable_through(core.durable_notice(&mut sb, 3)), None);
}

/// A stored envelope that no longer decodes (the store handed back bytes it
/// was never given) is refused with `Internal`, on a pull and on a push,
/// instead of being sent on; the envelopes around it still page normally.
#[test]
fn a_stored_envelope_that_does_not_decode_is_refused_not_sent() {
    let core = core_with(default_config());
    let alice = Device::new(1, 50);
    let bob = Device::new(2, 60);
    let mut sa = register(&core, &alice, [1; 32]);
    let mut sb = register(&core, &bob, [2; 32]);
    send(&core, &mut sa, vec![envelope(&alice, &bob, 1, 50)], NOW);
    let good = envelope(&alice, &bob, 2, 50);
    let corrupt = NewEnvelope {
        recipient: bob.id,
        sender: alice.id,
        message_id: good.header.message_id,
        conversation: good.header.conversation_id,
        sender_seq: 2,
        bytes: vec![0xEE; 120],
        expires_at_ms: NOW + 60_000,
    };
    core.store().commit(std::slice::from_ref(&corrupt)).unwrap();

    let a = core.handle(
        &mut sb,
        req(
            3,
            Request::Pull {
                after: 0,
                limit: 200,
                ack: 0,
            },
        ),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::Internal);
    // The envelope before it still comes alone, and the session goes on.
    let a = core.handle(
        &mut sb,
        req(
            4,
            Request::Pull {
                after: 0,
                limit: 1,
                ack: 0,
            },
        ),
        NOW,
        [0; 32],
    );
    match frame(&a) {
        ServerFrame::Response {
            response: Response::Page(p),
            ..
        } => {
            assert_eq!(
                p.envelopes.iter().map(|d| d.seq).collect::<Vec<_>>(),
                vec![1]
            );
        }
        other => panic!("expected a page, got {other:?}"),
    }

    // Live: a corrupt envelope committed after the inbox drained is not pushed.
    let (_, _) = pull(&core, &mut sb, 2, 2);
    assert!(sb.is_live());
    let later = NewEnvelope {
        sender_seq: 3,
        message_id: envelope(&alice, &bob, 3, 50).header.message_id,
        ..corrupt
    };
    core.store().commit(std::slice::from_ref(&later)).unwrap();
    let a = core.pump(&mut sb);
    assert!(pushed_seqs(&a).is_empty(), "{a:?}");
    assert_eq!(error_code(&a), ErrorCode::Internal);
    assert!(!sb.is_live());
}

#[test]
fn prekeys_and_device_lists() {
    let core = core_with(default_config());
    let alice = Device::new(1, 50);
    let alice2 = Device::new(4, 50); // same user
    let bob = Device::new(2, 60);
    let mut sa = register(&core, &alice, [1; 32]);
    let mut sb = register(&core, &bob, [2; 32]);
    let a = core.handle(
        &mut sb,
        req(1, Request::FetchPrekeys { device: alice.id }),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::NoPrekeys);
    let a = core.handle(
        &mut sb,
        req(
            1,
            Request::FetchPrekeys {
                device: DeviceId([77; 16]),
            },
        ),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::UnknownDevice);
    let publish = Request::PublishPrekeys {
        signed_prekey: SignedPrekey {
            id: 1,
            public: [5; 32],
            signature: [6; 64],
        },
        one_time_prekeys: vec![
            OneTimePrekey {
                id: 1,
                public: [7; 32],
            },
            OneTimePrekey {
                id: 2,
                public: [8; 32],
            },
        ],
    };
    let a = core.handle(&mut sa, req(2, publish), NOW, [0; 32]);
    assert!(matches!(
        frame(&a),
        ServerFrame::Response {
            response: Response::PrekeysPublished {
                one_time_prekeys_left: 2
            },
            ..
        }
    ));
    let a = core.handle(
        &mut sb,
        req(3, Request::FetchPrekeys { device: alice.id }),
        NOW,
        [0; 32],
    );
    match frame(&a) {
        ServerFrame::Response {
            response: Response::Prekeys(b),
            ..
        } => {
            assert_eq!(b.device, alice.id);
            assert!(b.one_time_prekey.is_some());
        }
        other => panic!("{other:?}"),
    }

    let list = alice.list_of(1, vec![alice.entry_for(&alice.user_key())]);
    // Bob's device may not publish Alice's list.
    let a = core.handle(
        &mut sb,
        req(4, Request::PublishDeviceList { list: list.clone() }),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::Forbidden);
    // A tampered list fails its signature.
    let mut tampered = list.clone();
    tampered.list.version = 2;
    let a = core.handle(
        &mut sa,
        req(5, Request::PublishDeviceList { list: tampered }),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::BadAuth);
    // Another device of the same user may.
    let mut sa2 = register(&core, &alice2, [3; 32]);
    let a = core.handle(
        &mut sa2,
        req(6, Request::PublishDeviceList { list: list.clone() }),
        NOW,
        [0; 32],
    );
    assert!(matches!(
        frame(&a),
        ServerFrame::Response {
            response: Response::DeviceListPublished { version: 1 },
            ..
        }
    ));
    let a = core.handle(
        &mut sb,
        req(
            7,
            Request::FetchDeviceList {
                user: alice.user_key(),
            },
        ),
        NOW,
        [0; 32],
    );
    assert!(
        matches!(frame(&a), ServerFrame::Response { response: Response::DeviceList(l), .. } if l == list)
    );
    // Republishing the same version is stale.
    let a = core.handle(
        &mut sa,
        req(8, Request::PublishDeviceList { list }),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::Forbidden);
}

#[test]
fn malformed_frames_get_an_error_then_close() {
    let core = core_with(default_config());
    let actions = core.malformed(&ProtocolError::Malformed("frame body"));
    assert_eq!(error_code(&actions), ErrorCode::BadFrame);
    assert!(matches!(
        actions.last(),
        Some(Action::Close {
            code: ErrorCode::BadFrame,
            ..
        })
    ));
}

#[test]
fn token_bucket_survives_clock_going_backwards() {
    let mut b = TokenBucket::new(1, 1, 10_000);
    assert!(b.take(10_000).is_ok());
    assert_eq!(b.take(5_000), Err(1000));
    assert!(b.take(11_000).is_ok());
}

/// A `Pull` whose merged ack is deferred answers exactly what the acking
/// `Pull` answers, leaves the session in the same state, and applying the
/// ack afterwards leaves the store in the same state, including around
/// tombstones, acks beyond the page or the head, and stale acks.
#[test]
fn deferred_ack_pull_answers_like_the_acking_pull() {
    let config = default_config();
    let (alice, bob) = (Device::new(1, 50), Device::new(2, 51));
    let cores = [core_with(config), core_with(config)];
    let mut sessions = Vec::new();
    for core in &cores {
        let mut a = register(core, &alice, [1; 32]);
        let b = register(core, &bob, [2; 32]);
        let early: Vec<_> = (1..=4).map(|i| envelope(&alice, &bob, i, 100)).collect();
        send(core, &mut a, early, NOW);
        let late: Vec<_> = (5..=10).map(|i| envelope(&alice, &bob, i, 100)).collect();
        send(core, &mut a, late, NOW + 1_000);
        // The first four expire unread and leave tombstones.
        let stats = core
            .store()
            .purge_expired(NOW + config.retention_ms, 100)
            .unwrap();
        assert_eq!(stats.expired, 4);
        sessions.push(b);
    }
    let [acking, deferring] = &cores;
    let (mut s1, mut s2) = (sessions.remove(0), sessions.remove(0));
    let (mut deferred_count, mut truncated) = (0, 0);
    for (after, ack) in [
        (0, 0),
        (0, 2),
        (3, 3),
        (2, 6),
        (5, 5),
        (6, 8),
        (0, 7),
        (7, 20),
        (0, 0),
        (10, 10),
    ] {
        let request = Request::Pull {
            after,
            limit: 3,
            ack,
        };
        let expected = acking.handle(&mut s1, req(9, request.clone()), NOW, [0; 32]);
        let (actions, deferred) =
            deferring.handle_deferring_ack(&mut s2, req(9, request), NOW, [0; 32], None);
        assert_eq!(actions, expected, "after {after} ack {ack}");
        if let ServerFrame::Response {
            response: Response::Page(p),
            ..
        } = frame(&actions)
            && p.truncated.is_some()
        {
            truncated += 1;
        }
        assert_eq!(
            (s2.acked, s2.delivered, s2.live, s2.window_full),
            (s1.acked, s1.delivered, s1.live, s1.window_full),
            "after {after} ack {ack}"
        );
        if let Some(d) = deferred {
            deferred_count += 1;
            assert_eq!(
                d,
                DeferredAck {
                    device: bob.id,
                    up_to: ack
                }
            );
            deferring.apply_ack(d).unwrap();
        } else {
            assert_eq!(ack, 0);
        }
        assert_eq!(
            deferring.store().inbox_state(&bob.id).unwrap(),
            acking.store().inbox_state(&bob.id).unwrap(),
            "after {after} ack {ack}"
        );
    }
    assert_eq!((deferred_count, truncated), (8, 3));
    // Unauthenticated or ack-less pulls are not deferred.
    let mut fresh = deferring.new_session(NOW);
    let pull = Request::Pull {
        after: 0,
        limit: 1,
        ack: 5,
    };
    let (actions, deferred) =
        deferring.handle_deferring_ack(&mut fresh, req(3, pull), NOW, [0; 32], None);
    assert_eq!(error_code(&actions), ErrorCode::NotAuthenticated);
    assert_eq!(deferred, None);
}

/// A `Pull` of `limit` above `after` with merged ack `ack`, through the
/// deferring path with `ahead`; returns the page, and applies the ack.
fn pull_ahead(
    core: &RelayCore<MemoryStore>,
    s: &mut Session,
    (after, limit, ack): (u64, u16, u64),
    ahead: Option<ReadAhead>,
) -> Page {
    let request = Request::Pull { after, limit, ack };
    let (actions, deferred) = core.handle_deferring_ack(s, req(9, request), NOW, [0; 32], ahead);
    if let Some(d) = deferred {
        core.apply_ack(d).unwrap();
    }
    match frame(&actions) {
        ServerFrame::Response {
            response: Response::Page(p),
            ..
        } => p.clone(),
        other => panic!("expected a page, got {other:?}"),
    }
}

fn seqs(page: &Page) -> Vec<u64> {
    page.envelopes.iter().map(|d| d.seq).collect()
}

/// A page read ahead answers the `Pull` of exactly that page, as the store
/// would, even with envelopes arriving in between (they follow it); a
/// `Pull` of any other page, and a `Pull` of a page that ended the inbox
/// when it was read (new envelopes may belong in it), read the store again.
#[test]
fn a_page_read_ahead_answers_only_the_pull_it_was_read_for() {
    let core = core_with(default_config());
    let (alice, bob) = (Device::new(1, 50), Device::new(2, 51));
    let mut a = register(&core, &alice, [1; 32]);
    let mut b = register(&core, &bob, [2; 32]);
    let first: Vec<_> = (1..=8).map(|i| envelope(&alice, &bob, i, 100)).collect();
    send(&core, &mut a, first, NOW);
    let used = || core.metrics().read_ahead_used_total.load(Ordering::Relaxed);
    let wasted = || {
        core.metrics()
            .read_ahead_wasted_total
            .load(Ordering::Relaxed)
    };

    // Page 1..=3 leaves envelopes behind: the next page is 4..=6.
    let page = pull_ahead(&core, &mut b, (0, 3, 0), None);
    assert_eq!((seqs(&page), page.remaining), (vec![1, 2, 3], 5));
    let next = b.take_next_page().expect("a page left envelopes behind");
    assert_eq!(b.take_next_page(), None, "taken once");
    let ahead = core.read_ahead(next).expect("read");
    // Two more arrive after the read; they follow the page.
    let late: Vec<_> = (9..=10).map(|i| envelope(&alice, &bob, i, 100)).collect();
    send(&core, &mut a, late, NOW);
    let page = pull_ahead(&core, &mut b, (3, 3, 3), Some(ahead));
    assert_eq!(seqs(&page), vec![4, 5, 6]);
    assert_eq!((used(), wasted()), (1, 0));
    assert!(!b.is_live());

    // A read ahead of 7..=9, but the device asks for 4..=6 again (say it
    // lost the page): the store answers, and the read ahead is wasted.
    let next = b.take_next_page().expect("more behind 6");
    assert_eq!(next.after, 6);
    let ahead = core.read_ahead(next).expect("read");
    let page = pull_ahead(&core, &mut b, (3, 3, 3), Some(ahead));
    assert_eq!(seqs(&page), vec![4, 5, 6]);
    assert_eq!((used(), wasted()), (1, 1));
    // Same start but another size: not the page either.
    let ahead = core
        .read_ahead(b.take_next_page().expect("more"))
        .expect("read");
    let page = pull_ahead(&core, &mut b, (6, 2, 6), Some(ahead));
    assert_eq!(seqs(&page), vec![7, 8]);
    assert_eq!((used(), wasted()), (1, 2));

    // The last page, 9..=10, ended the inbox when read ahead; one more
    // arrives, and the Pull reads the store again and gets it too.
    let next = b.take_next_page().expect("more behind 8");
    let ahead = core
        .read_ahead(NextPage { limit: 3, ..next })
        .expect("read");
    send(&core, &mut a, vec![envelope(&alice, &bob, 11, 100)], NOW);
    let page = pull_ahead(&core, &mut b, (8, 3, 8), Some(ahead));
    assert_eq!((seqs(&page), page.remaining), (vec![9, 10, 11], 0));
    assert_eq!((used(), wasted()), (1, 3));
    assert!(b.is_live());
    assert_eq!(b.take_next_page(), None, "nothing left behind");

    // Another device's session cannot be served bob's page (9 of 9..=11).
    let stolen = core
        .read_ahead(NextPage::of_pull(bob.id, 0, 1, 0))
        .expect("read");
    assert_eq!(stolen.at.device, bob.id);
    let page = pull_ahead(&core, &mut a, (0, 1, 0), Some(stolen));
    assert!(page.envelopes.is_empty(), "alice's own inbox is empty");
    assert_eq!((used(), wasted()), (1, 4));
}

/// The message of the error answer in `actions`.
fn error_message(actions: &[Action]) -> String {
    match frame(actions) {
        ServerFrame::Error { error, .. } => error.message.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Attack: contact X publishes a list, correctly signed by X's user key, that
/// names contact A's device (its id and public keys are public), so that
/// peers attribute A's device to X. Without A's device's membership proof
/// for X's user key the relay refuses the list with `BadAuth` and stores
/// nothing, whether the proof is missing, copied from A's own list (bound to
/// A's user key) or made by X's own device key.
#[test]
fn a_list_naming_another_users_device_is_refused() {
    let core = core_with(default_config());
    let alice = Device::new(1, 50);
    let mallory = Device::new(2, 60);
    let mut sa = register(&core, &alice, [1; 32]);
    let mut sm = register(&core, &mallory, [2; 32]);

    // Alice's own list, with her device's proof, is accepted.
    let alice_entry = alice.entry_for(&alice.user_key());
    let alices = alice.list_of(1, vec![alice_entry.clone()]);
    let a = core.handle(
        &mut sa,
        req(1, Request::PublishDeviceList { list: alices }),
        NOW,
        [0; 32],
    );
    assert!(matches!(
        frame(&a),
        ServerFrame::Response {
            response: Response::DeviceListPublished { version: 1 },
            ..
        }
    ));

    let own = mallory.entry_for(&mallory.user_key());
    let mut unproven = alice_entry.clone();
    unproven.membership_signature = [0; 64];
    let mut self_signed = alice_entry.clone();
    self_signed.membership_signature = mallory
        .key
        .sign(&alice_entry.membership_bytes(&mallory.user_key()))
        .to_bytes();
    let attacks = [
        ("no proof", unproven),
        ("proof copied from Alice's list", alice_entry.clone()),
        ("proof by Mallory's device", self_signed),
    ];
    for (n, (what, stolen)) in attacks.into_iter().enumerate() {
        let list = mallory.list_of(1, vec![own.clone(), stolen]);
        let a = core.handle(
            &mut sm,
            req(2 + n as u32, Request::PublishDeviceList { list }),
            NOW,
            [0; 32],
        );
        assert_eq!(error_code(&a), ErrorCode::BadAuth, "{what}");
        assert!(
            error_message(&a).contains("entry 1 has no valid membership proof"),
            "{what}: {}",
            error_message(&a)
        );
        assert_eq!(
            core.store().device_list(&mallory.user_key()).unwrap(),
            None,
            "{what}: nothing stored"
        );
    }
    // Mallory's list of only her own device is fine.
    let list = mallory.list_of(1, vec![own]);
    let a = core.handle(
        &mut sm,
        req(9, Request::PublishDeviceList { list: list.clone() }),
        NOW,
        [0; 32],
    );
    assert!(matches!(
        frame(&a),
        ServerFrame::Response {
            response: Response::DeviceListPublished { version: 1 },
            ..
        }
    ));
    assert_eq!(
        core.store().device_list(&mallory.user_key()).unwrap(),
        Some(list)
    );
}

// ---- blobs (history archives) ------------------------------------------------------------

fn blob_put(
    core: &RelayCore<MemoryStore>,
    s: &mut Session,
    blob: BlobId,
    offset: u64,
    total_len: u64,
    bytes: &[u8],
    now: u64,
) -> Vec<Action> {
    core.handle(
        s,
        req(
            20,
            Request::BlobPut {
                blob,
                offset,
                total_len,
                bytes: bytes.to_vec(),
            },
        ),
        now,
        [0; 32],
    )
}

fn committed_of(actions: &[Action]) -> u64 {
    match frame(actions) {
        ServerFrame::Response {
            response: Response::BlobStored { committed, .. },
            ..
        } => committed,
        other => panic!("expected BlobStored, got {other:?}"),
    }
}

fn blob_get(
    core: &RelayCore<MemoryStore>,
    s: &mut Session,
    blob: BlobId,
    offset: u64,
    max: u32,
    now: u64,
) -> Vec<Action> {
    core.handle(
        s,
        req(21, Request::BlobGet { blob, offset, max }),
        now,
        [0; 32],
    )
}

fn chunk_of(actions: &[Action]) -> (u64, Vec<u8>) {
    match frame(actions) {
        ServerFrame::Response {
            response: Response::BlobChunk {
                committed, bytes, ..
            },
            ..
        } => (committed, bytes.clone()),
        other => panic!("expected BlobChunk, got {other:?}"),
    }
}

#[test]
fn blobs_upload_resume_and_download_by_a_device_that_knows_the_id() {
    let core = core_with(default_config());
    let (old, new) = (Device::new(1, 1), Device::new(2, 1));
    let mut so = register(&core, &old, [1; 32]);
    let mut sn = register(&core, &new, [2; 32]);
    let blob = BlobId([0xb1; 16]);
    assert_eq!(
        committed_of(&blob_put(&core, &mut so, blob, 0, 10, b"hello", NOW)),
        5
    );
    // A lost answer: the same put again changes nothing.
    assert_eq!(
        committed_of(&blob_put(&core, &mut so, blob, 0, 10, b"hello", NOW)),
        5
    );
    // Resume point for the uploader (and any reader).
    let status = core.handle(&mut sn, req(22, Request::BlobStatus { blob }), NOW, [0; 32]);
    match frame(&status) {
        ServerFrame::Response {
            response:
                Response::BlobState {
                    total_len,
                    committed,
                    expires_at_ms,
                    ..
                },
            ..
        } => {
            assert_eq!((total_len, committed), (10, 5));
            assert_eq!(expires_at_ms, NOW + crate::store::BLOB_TTL_MS);
        }
        other => panic!("{other:?}"),
    }
    // Overlapping resume: the committed part must match, the rest appends.
    assert_eq!(
        committed_of(&blob_put(&core, &mut so, blob, 3, 10, b"loworld", NOW)),
        10
    );
    assert_eq!(
        chunk_of(&blob_get(&core, &mut sn, blob, 0, 1 << 20, NOW)),
        (10, b"helloworld".to_vec())
    );
    assert_eq!(
        chunk_of(&blob_get(&core, &mut sn, blob, 7, 2, NOW)),
        (10, b"rl".to_vec())
    );
    assert_eq!(
        chunk_of(&blob_get(&core, &mut sn, blob, 10, 5, NOW)),
        (10, Vec::new())
    );
    assert_eq!(
        error_code(&blob_get(&core, &mut sn, blob, 11, 5, NOW)),
        ErrorCode::UnknownBlob
    );
    // A gap is refused.
    let other = BlobId([0xb2; 16]);
    blob_put(&core, &mut so, other, 0, 10, b"ab", NOW);
    assert_eq!(
        error_code(&blob_put(&core, &mut so, other, 5, 10, b"x", NOW)),
        ErrorCode::BadFrame
    );
    assert_eq!(
        error_code(&blob_put(&core, &mut so, other, 2, 11, b"x", NOW)),
        ErrorCode::BadFrame
    );
}

#[test]
fn a_stranger_cannot_overwrite_or_extend_a_blob() {
    let core = core_with(default_config());
    let owner = Device::new(1, 1);
    let stranger = Device::new(3, 9);
    let mut so = register(&core, &owner, [1; 32]);
    let mut sx = register(&core, &stranger, [3; 32]);
    let blob = BlobId([0xb1; 16]);
    blob_put(&core, &mut so, blob, 0, 8, b"abcd", NOW);
    // The stranger knows the id (it is a download capability) but may not write.
    for (offset, bytes) in [(0u64, &b"evil"[..]), (4, b"evil"), (0, b"abcdefgh")] {
        assert_eq!(
            error_code(&blob_put(&core, &mut sx, blob, offset, 8, bytes, NOW)),
            ErrorCode::Forbidden
        );
    }
    // Nor may the owner rewrite committed bytes.
    assert_eq!(
        error_code(&blob_put(&core, &mut so, blob, 0, 8, b"abXd", NOW)),
        ErrorCode::Forbidden
    );
    assert_eq!(
        chunk_of(&blob_get(&core, &mut sx, blob, 0, 100, NOW)),
        (4, b"abcd".to_vec())
    );
    // Unauthenticated connections get nothing.
    let mut anon = core.new_session(NOW);
    assert_eq!(
        error_code(&blob_get(&core, &mut anon, blob, 0, 100, NOW)),
        ErrorCode::NotAuthenticated
    );
}

#[test]
fn blob_limits_refuse_oversized_and_too_many_blobs() {
    let mut config = default_config();
    config.blobs = crate::store::BlobLimits {
        max_blob_bytes: 100,
        max_blobs_per_device: 2,
        max_blob_bytes_per_device: 150,
        ttl_ms: 1_000,
    };
    let core = core_with(config);
    let d = Device::new(1, 1);
    let mut s = register(&core, &d, [1; 32]);
    assert_eq!(
        error_code(&blob_put(&core, &mut s, BlobId([1; 16]), 0, 101, b"x", NOW)),
        ErrorCode::BlobLimit
    );
    blob_put(&core, &mut s, BlobId([2; 16]), 0, 100, b"x", NOW);
    // 100 + 60 > 150 bytes per device.
    assert_eq!(
        error_code(&blob_put(&core, &mut s, BlobId([3; 16]), 0, 60, b"x", NOW)),
        ErrorCode::BlobLimit
    );
    blob_put(&core, &mut s, BlobId([3; 16]), 0, 50, b"x", NOW);
    // A third blob exceeds the count.
    assert_eq!(
        error_code(&blob_put(&core, &mut s, BlobId([4; 16]), 0, 1, b"x", NOW)),
        ErrorCode::BlobLimit
    );
    // Expiry frees the room, and the expired blobs are gone for readers.
    let later = NOW + 1_000;
    assert_eq!(
        error_code(&blob_get(&core, &mut s, BlobId([2; 16]), 0, 10, later)),
        ErrorCode::UnknownBlob
    );
    assert_eq!(
        committed_of(&blob_put(&core, &mut s, BlobId([4; 16]), 0, 1, b"x", later)),
        1
    );
    assert_eq!(core.store().purge_blobs(later, 100).unwrap(), 2);
    assert_eq!(core.store().purge_blobs(later, 100).unwrap(), 0);
    // A put at a later offset of an expired blob does not revive it.
    assert_eq!(
        error_code(&blob_put(
            &core,
            &mut s,
            BlobId([2; 16]),
            1,
            100,
            b"y",
            later
        )),
        ErrorCode::UnknownBlob
    );
}

#[path = "tests_lifecycle.rs"]
mod lifecycle;

#[test]
fn the_claim_precedes_auth_ok_and_an_adopted_ack_moves_its_cursor() {
    let core = core_with(default_config());
    let alice = Device::new(1, 50);
    let bob = Device::new(2, 60);
    let mut sa = register(&core, &alice, [1; 32]);
    register(&core, &bob, [2; 32]);
    send(
        &core,
        &mut sa,
        (1..=3).map(|i| envelope(&alice, &bob, i, 50)).collect(),
        NOW,
    );
    // Bob's new connection authenticates while his old one still holds an
    // ack of 1..=2 it has not applied.
    let mut s = core.new_session(NOW);
    let c = challenge_of(&core.handle(
        &mut s,
        req(1, Request::Hello { device: bob.id }),
        NOW,
        [3; 32],
    ));
    let mut actions = core.handle(
        &mut s,
        req(
            2,
            Request::Auth {
                signature: bob.sign_challenge(&c),
            },
        ),
        NOW,
        [0; 32],
    );
    assert_eq!(actions.first(), Some(&Action::Authenticated(bob.id)));
    let acked_in = |actions: &[Action]| match frame(actions) {
        ServerFrame::Response {
            response: Response::Authenticated(ok),
            ..
        } => (ok.acked, ok.inbox_head),
        other => panic!("expected AuthOk, got {other:?}"),
    };
    assert_eq!(acked_in(&actions), (0, 3));
    // The old connection received an ack of 1..=2 it has not applied: the
    // new one applies it and reports the cursor it moved to.
    core.adopt_ack(&mut s, 2, &mut actions).unwrap();
    assert_eq!(core.store().inbox_state(&bob.id).unwrap().acked, 2);
    assert_eq!(acked_in(&actions), (2, 3));
    assert_eq!((s.acked, s.delivered), (2, 2));
    // Live pushes start after the cursor, not at what was acknowledged.
    let (page, _) = pull(&core, &mut s, 2, 0);
    assert_eq!(
        page.envelopes.iter().map(|d| d.seq).collect::<Vec<_>>(),
        vec![3]
    );
}
