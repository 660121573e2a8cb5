//! History transfer across relay crashes, with a real relay process: the
//! relay is killed with SIGKILL in the middle of the old device's upload and
//! again in the middle of the new device's download, and restarted on the
//! same data directory. Both transfers resume from the point the relay had
//! committed (the restarted relay's blob byte counters show that only the
//! rest crossed the wire), the new device also restarts from its own storage
//! in the middle of the download, and the imported history equals the old
//! device's, in order, with no duplicates. Messages sent while the download
//! is cut follow the imported history on the new device.
//!
//! The devices are in-process drivers of the CLI (in memory storage) with a
//! small piece size, so a history of a few hundred messages spans many
//! `BlobPut`s and `BlobGet`s and several archive chunks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_cli::driver::{Discard, Driver, Outcome, View, cli_engine_config, now_ms, os_seed};
use hush_cli::{CertCheck, RelayTarget, Transport};
use hush_client::engine::history_transfer::MESSAGES_PER_CHUNK;
use hush_client::{
    Command, ContactCode, Engine, EngineConfig, LinkCode, MemoryStorage, MessageState, Reply,
};
use hush_protocol::{ConversationId, MessageId};
use hush_tests::RelayProcess;
use std::time::Duration;
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(60);
/// Bytes per `BlobPut` / `BlobGet`: small, so the archive takes many.
const PIECE: u32 = 2048;
/// Messages each contact writes.
const PER_CONTACT: usize = 300;

fn cfg() -> EngineConfig {
    EngineConfig {
        history_piece_bytes: PIECE,
        ..cli_engine_config()
    }
}

async fn run(d: &mut Driver<MemoryStorage>, what: &str, done: impl FnMut(&View<'_>) -> bool) {
    let mut stop = None;
    let out = d
        .run_until(Instant::now() + BOUND, &mut stop, &mut Discard, done)
        .await
        .unwrap();
    assert_eq!(out, Outcome::Done, "{what}");
}

async fn settle(d: &mut Driver<MemoryStorage>) {
    run(d, "settle", |v| v.settled()).await;
}

async fn device(target: &RelayTarget, name: &str) -> Driver<MemoryStorage> {
    let (engine, step) =
        Engine::create(now_ms(), os_seed().unwrap(), &target.addr, name, cfg()).unwrap();
    let mut d = Driver::new(engine, MemoryStorage::new(), cfg(), target.clone());
    d.start(step, &mut Discard).await.unwrap();
    d
}

async fn add(d: &mut Driver<MemoryStorage>, code: &str) {
    let code = ContactCode::parse(code).unwrap();
    d.command(Command::AddContact { code }, &mut Discard)
        .await
        .unwrap();
    settle(d).await;
}

async fn send(d: &mut Driver<MemoryStorage>, conversation: ConversationId, texts: Vec<String>) {
    let commands = texts
        .into_iter()
        .map(|text| Command::SendText { conversation, text })
        .collect();
    d.commands(commands, &mut Discard).await.unwrap();
    settle(d).await;
}

type Shown = (MessageId, String, bool, bool, Option<MessageState>);

fn shown(d: &Driver<MemoryStorage>, conversation: &ConversationId) -> Vec<Shown> {
    hush_client::history(&*d.storage(), conversation, None, 100_000)
        .unwrap()
        .into_iter()
        .map(|e| {
            (
                e.record.id,
                e.record.text,
                e.record.outgoing,
                e.read,
                e.state,
            )
        })
        .collect()
}

/// A counter of the relay's `/metrics`.
fn metric(relay: &RelayProcess, name: &str) -> u64 {
    let (status, body) = relay.http_get("/metrics").unwrap();
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_upload_and_download_resume_after_relay_kill9_from_the_committed_offset() {
    let mut relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let target = RelayTarget {
        addr: relay.quic_addr().to_string(),
        cert: CertCheck::Pinned(relay.cert_sha256()),
        transport: Transport::Quic,
    };

    let mut alice = device(&target, "alice").await;
    let mut bob = device(&target, "bob").await;
    let mut carol = device(&target, "carol").await;
    settle(&mut alice).await;
    let alice_code = alice.engine().contact_code().to_text().unwrap();
    for d in [&mut bob, &mut carol] {
        add(d, &alice_code).await;
        let code = d.engine().contact_code().to_text().unwrap();
        add(&mut alice, &code).await;
    }
    let with_bob = bob.engine().contacts()[0].2;
    let with_carol = carol.engine().contacts()[0].2;

    // The history: both contacts write, alice answers in between.
    send(
        &mut alice,
        with_bob,
        (0..5).map(|i| format!("alice to bob {i}")).collect(),
    )
    .await;
    send(
        &mut bob,
        with_bob,
        (0..PER_CONTACT).map(|i| format!("bob {i}")).collect(),
    )
    .await;
    send(
        &mut carol,
        with_carol,
        (0..PER_CONTACT).map(|i| format!("carol {i}")).collect(),
    )
    .await;
    settle(&mut alice).await;
    send(
        &mut alice,
        with_carol,
        (0..5).map(|i| format!("alice to carol {i}")).collect(),
    )
    .await;
    settle(&mut carol).await;
    settle(&mut alice).await;
    let total = shown(&alice, &with_bob).len() + shown(&alice, &with_carol).len();
    assert_eq!(total, 2 * PER_CONTACT + 10);

    // Link a new device; it sends its hello and history request.
    let Some(Reply::LinkCode(code)) = alice
        .command(Command::CreateLinkCode, &mut Discard)
        .await
        .unwrap()
    else {
        panic!("no link code");
    };
    settle(&mut alice).await;
    let code = LinkCode::parse(code.as_str()).unwrap();
    let (engine, step) =
        Engine::join_with_history(now_ms(), os_seed().unwrap(), &code, cfg(), true).unwrap();
    let mut alice2 = Driver::new(engine, MemoryStorage::new(), cfg(), target.clone());
    alice2.start(step, &mut Discard).await.unwrap();
    run(&mut alice2, "link hello sent", |v| {
        v.connected && v.outstanding == 0 && v.engine.backlog().is_empty()
    })
    .await;

    // The old device exports and uploads; kill the relay a few pieces in.
    run(&mut alice, "a few pieces uploaded", |v| {
        v.engine
            .history_upload_progress()
            .is_some_and(|(done, _)| done >= 4 * u64::from(PIECE))
    })
    .await;
    let (up_cut, archive) = alice.engine().history_upload_progress().unwrap();
    assert!(
        archive > 20 * u64::from(PIECE),
        "the archive spans many pieces: {archive}"
    );
    assert!(up_cut < archive);
    relay.restart().await.unwrap();
    assert_eq!(
        relay.quic_addr().to_string(),
        target.addr,
        "restarted on the same port"
    );
    run(&mut alice, "upload finished", |v| {
        !v.engine.history_uploading() && v.settled()
    })
    .await;
    // The restarted relay received only what it had not committed: at most
    // the archive past the point the client saw confirmed before the kill.
    let received = metric(&relay, "hush_blob_bytes_received_total");
    assert!(
        received > 0 && received <= archive - up_cut,
        "after the restart the relay received {received} of {archive} bytes; \
         {up_cut} were committed before the kill"
    );

    // The new device downloads; cut it (relay SIGKILL, and the device
    // restarts from its storage) after the first archive chunk is imported.
    run(&mut alice2, "first chunk imported", |v| {
        v.engine
            .history_import_progress()
            .is_some_and(|(done, _)| done >= MESSAGES_PER_CHUNK as u64)
    })
    .await;
    let (down_cut, down_total) = alice2.engine().history_download_progress().unwrap();
    assert_eq!(down_total, archive);
    assert!(
        down_cut > 0 && down_cut < archive,
        "{down_cut} of {archive}"
    );
    relay.restart().await.unwrap();
    alice2.shutdown().await;
    let storage = alice2.into_storage().unwrap();
    let mut alice2 = Driver::load(storage, cfg(), target.clone()).unwrap();
    let (done, of) = alice2.engine().history_import_progress().unwrap();
    assert!(done >= MESSAGES_PER_CHUNK as u64 && done < of);

    // Messages sent while the download is cut (bob reconnects, which also
    // refreshes alice's device list).
    bob.shutdown().await;
    send(
        &mut bob,
        with_bob,
        (0..3).map(|i| format!("during the transfer {i}")).collect(),
    )
    .await;

    run(&mut alice2, "import finished", |v| {
        !v.engine.history_import_pending() && v.settled()
    })
    .await;
    let sent = metric(&relay, "hush_blob_bytes_sent_total");
    assert!(
        sent > 0 && sent <= archive - down_cut,
        "after the restart the relay sent {sent} of {archive} bytes; \
         {down_cut} were imported before the cut"
    );
    // The old device gets them too (it notices the restart when it next
    // talks to the relay).
    let deadline = Instant::now() + BOUND;
    while shown(&alice, &with_bob).len() < shown(&alice2, &with_bob).len() {
        assert!(
            Instant::now() < deadline,
            "the old device never got bob's messages"
        );
        let mut stop = None;
        alice
            .run_until(
                Instant::now() + Duration::from_millis(500),
                &mut stop,
                &mut Discard,
                |_| false,
            )
            .await
            .unwrap();
    }
    settle(&mut alice).await;

    // Same history, same order, nothing twice; the messages of the cut
    // come after the imported ones on both devices.
    for conversation in [with_bob, with_carol] {
        let old = shown(&alice, &conversation);
        let new = shown(&alice2, &conversation);
        let mut ids: Vec<_> = new.iter().map(|m| m.0).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), new.len(), "no duplicates");
        assert_eq!(new, old);
    }
    let bob_thread = shown(&alice2, &with_bob);
    let tail: Vec<&str> = bob_thread[bob_thread.len() - 3..]
        .iter()
        .map(|m| m.1.as_str())
        .collect();
    assert_eq!(
        tail,
        [
            "during the transfer 0",
            "during the transfer 1",
            "during the transfer 2"
        ]
    );
    assert_eq!(
        bob_thread.len() + shown(&alice2, &with_carol).len(),
        total + 3
    );
}
