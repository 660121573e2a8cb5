//! The `hush` native driver killed in the middle of a catch-up, against an
//! in-process relay over real QUIC on 127.0.0.1.
//!
//! Attack on the store-before-ack rule: a device that acknowledges a page
//! to the relay before the page is durable loses it if the process dies in
//! between (the relay deletes what is acknowledged). Here the recipient's
//! store hangs inside a commit in the middle of a backlog read in small
//! pages (after a slow commit, so that it holds several pages handled while
//! that one ran, when pipelined), the driver goes on handling the pages
//! that keep arriving, and then the process "dies": the driver is dropped
//! and the hanging commit never lands. A new driver loaded from what the store
//! holds must then receive every message exactly once, in order, from the
//! relay alone (the sender is not running, so nothing lost could be sent
//! again). Run with commits awaited one by one and with commits pipelined.

use hush_cli::driver::{Discard, Driver, Outcome, cli_engine_config, now_ms, os_seed};
use hush_cli::{CertCheck, CliError, RelayTarget};
use hush_client::{
    Command, ContactCode, Engine, MemoryStorage, MessageState, Reply, Storage, StorageError,
    StorageOp,
};
use hush_relay::{Config, RelayHandle, SystemClock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const MESSAGES: usize = 60;
const BOUND: Duration = Duration::from_secs(30);

/// What the "disk" holds and the hang control, shared with the test.
#[derive(Default)]
struct Disk {
    committed: Mutex<MemoryStorage>,
    applies: AtomicU64,
    /// The commit (1-based count of non-empty applies) that stalls until
    /// released, so that the pages arriving meanwhile are handled and
    /// queued, to be committed together in the next commit; 0: none.
    stall_at: AtomicU64,
    /// Told once the stalling commit is reached.
    stalled: tokio::sync::Notify,
    /// Released by the test: the stalling commit goes on.
    stall_gate: (Mutex<bool>, Condvar),
    /// The commit that hangs until the process is dead; 0: none.
    hang_at: AtomicU64,
    /// Told once the hanging commit is reached.
    reached: tokio::sync::Notify,
    /// The process died: nothing more is written.
    dead: AtomicBool,
    /// Released once the process is dead (the hanging commit then returns
    /// without writing anything).
    gate: (Mutex<bool>, Condvar),
}

#[allow(clippy::unwrap_used)]
fn committed(d: &Disk) -> std::sync::MutexGuard<'_, MemoryStorage> {
    d.committed.lock().unwrap()
}

/// A store on the shared "disk".
struct Crashy(Arc<Disk>);

impl Storage for Crashy {
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        committed(&self.0).scan_prefix(prefix)
    }

    fn scan_back(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        committed(&self.0).scan_back(prefix, before, limit)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        committed(&self.0).get(key)
    }

    #[allow(clippy::unwrap_used)]
    fn apply(&mut self, batch: &[StorageOp]) -> Result<(), StorageError> {
        let disk = &self.0;
        if disk.dead.load(Ordering::SeqCst) {
            return Err(StorageError::Backend("the process is dead".into()));
        }
        if batch.is_empty() {
            return Ok(());
        }
        let n = disk.applies.fetch_add(1, Ordering::SeqCst) + 1;
        if n == disk.stall_at.load(Ordering::SeqCst) {
            disk.stalled.notify_one();
            let (lock, cv) = &disk.stall_gate;
            let mut released = lock.lock().unwrap();
            while !*released {
                released = cv.wait(released).unwrap();
            }
        }
        if n == disk.hang_at.load(Ordering::SeqCst) {
            disk.reached.notify_one();
            let (lock, cv) = &disk.gate;
            let mut released = lock.lock().unwrap();
            while !*released {
                released = cv.wait(released).unwrap();
            }
            // Killed mid-commit: this batch never reached the disk.
            return Err(StorageError::Backend("the process is dead".into()));
        }
        committed(disk).apply(batch)
    }
}

async fn settle<S: Storage + Send + 'static>(d: &mut Driver<S>) -> Result<Outcome, CliError> {
    let mut stop = None;
    d.run_until(Instant::now() + BOUND, &mut stop, &mut Discard, |v| {
        v.settled()
    })
    .await
}

fn cfg(page_limit: u16) -> hush_client::EngineConfig {
    hush_client::EngineConfig {
        page_limit,
        ..cli_engine_config()
    }
}

async fn device<S: Storage + Send + 'static>(
    storage: S,
    name: &str,
    target: &RelayTarget,
    page_limit: u16,
) -> Result<Driver<S>, CliError> {
    let cfg = cfg(page_limit);
    let (engine, step) = Engine::create(now_ms(), os_seed()?, &target.addr, name, cfg.clone())?;
    let mut d = Driver::new(engine, storage, cfg, target.clone());
    d.start(step, &mut Discard).await?;
    if settle(&mut d).await? != Outcome::Done {
        return Err(CliError::NotConfirmed(format!("{name} did not settle")));
    }
    Ok(d)
}

fn code_named<S: Storage + Send + 'static>(d: &Driver<S>, name: &str) -> ContactCode {
    let mut c = d.engine().contact_code();
    c.name = name.into();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_commit_during_catch_up_loses_and_repeats_nothing() {
    killed_mid_catch_up(false).await;
}

/// Pipelined: pages handled while the commit hangs are queued behind it;
/// their pulls (which acknowledge the hanging page) must not leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_pipelined_commit_during_catch_up_loses_and_repeats_nothing() {
    killed_mid_catch_up(true).await;
}

// The body of the two tests above (test code: failures are assertions).
#[allow(clippy::unwrap_used, clippy::panic)]
async fn killed_mid_catch_up(pipelined: bool) {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayHandle::start(
        Config::default_for(dir.path().join("relay")),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let target = RelayTarget {
        addr: relay.quic_addr().to_string(),
        cert: CertCheck::Pinned(CertCheck::parse_hash(&relay.cert_sha256_hex()).unwrap()),
        transport: hush_cli::Transport::Quic,
    };
    let mut alice = device(MemoryStorage::new(), "alice", &target, 200)
        .await
        .unwrap();
    let disk = Arc::new(Disk::default());
    // Small pages: bob's catch-up is many pulls, several in flight.
    const PAGE: u16 = 4;
    let mut bob = device(Crashy(disk.clone()), "bob", &target, PAGE)
        .await
        .unwrap();
    bob.set_pipelined(pipelined);
    let bob_code = code_named(&bob, "bob");
    alice
        .command(
            Command::AddContact {
                code: bob_code.clone(),
            },
            &mut Discard,
        )
        .await
        .unwrap();
    assert_eq!(settle(&mut alice).await.unwrap(), Outcome::Done);
    bob.command(
        Command::AddContact {
            code: code_named(&alice, "alice"),
        },
        &mut Discard,
    )
    .await
    .unwrap();
    assert_eq!(settle(&mut bob).await.unwrap(), Outcome::Done);

    // alice sends while bob is offline: he reads them as a backlog.
    bob.shutdown().await;
    let conversation = alice.engine().conversation_with(&bob_code.user);
    let sends = (0..MESSAGES)
        .map(|i| Command::SendText {
            conversation,
            text: format!("m{i:02}"),
        })
        .collect();
    let ids: Vec<_> = alice
        .commands(sends, &mut Discard)
        .await
        .unwrap()
        .into_iter()
        .map(|r| match r {
            Some(Reply::Message(id)) => id,
            other => panic!("unexpected reply {other:?}"),
        })
        .collect();
    let mut stop = None;
    alice
        .run_until(Instant::now() + BOUND, &mut stop, &mut Discard, |v| {
            ids.iter()
                .all(|id| v.engine.message_state(id) == Some(MessageState::Stored))
        })
        .await
        .unwrap();
    assert!(
        ids.iter()
            .all(|id| alice.engine().message_state(id) == Some(MessageState::Stored))
    );
    // alice stops: nothing bob loses could be sent again.
    let from = alice.engine().device_id();
    let alice_user = alice.engine().user_key();
    alice.shutdown().await;

    // bob reads the backlog; a commit a few pages in hangs, then he dies.
    let conv = bob.engine().conversation_with(&alice_user);
    // A few pages in, one commit stalls (the pages arriving meanwhile are
    // handled and queued when pipelined); the next one, which holds them
    // all, hangs until the process dies.
    let first = disk.applies.load(Ordering::SeqCst);
    disk.stall_at.store(first + 5, Ordering::SeqCst);
    disk.hang_at.store(first + 6, Ordering::SeqCst);
    {
        let mut stop = None;
        let mut sink = Discard;
        let run = bob.run_until(Instant::now() + BOUND, &mut stop, &mut sink, |v| {
            v.settled() && v.engine.delivered_through(&from, &conv) >= MESSAGES as u64
        });
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => panic!("the catch-up ended before the commit stalled: {r:?}"),
            stalled = hush_tests::wait::within(BOUND, "the stalling commit", disk.stalled.notified()) => stalled.unwrap(),
        }
        // Bounded: the driver reads on while the commit is stalled.
        let _ = tokio::time::timeout(Duration::from_millis(300), &mut run).await;
        {
            let (lock, cv) = &disk.stall_gate;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }
        tokio::select! {
            r = &mut run => panic!("the catch-up ended before the commit hung: {r:?}"),
            hung = hush_tests::wait::within(BOUND, "the hanging commit", disk.reached.notified()) => hung.unwrap(),
        }
        if pipelined {
            // The driver goes on reading and decrypting the pages that
            // arrive while the commit hangs (bounded: it is then killed).
            let _ = tokio::time::timeout(Duration::from_millis(300), &mut run).await;
        }
        // Killed: the future and the driver are dropped mid-commit.
    }
    drop(bob);
    disk.dead.store(true, Ordering::SeqCst);
    {
        let (lock, cv) = &disk.gate;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }

    // A new process: the engine from what the disk holds, the same relay.
    let survived = committed(&disk).clone();
    let before = hush_client::history(&survived, &conv, None, 1000)
        .unwrap()
        .len();
    assert!(
        before > 0 && before < MESSAGES,
        "the kill was not in the middle of the catch-up ({before} stored)"
    );
    let mut bob = Driver::load(survived, cfg(PAGE), target.clone()).unwrap();
    let mut stop = None;
    let outcome = bob
        .run_until(
            Instant::now() + Duration::from_secs(15),
            &mut stop,
            &mut Discard,
            |v| v.settled() && v.engine.delivered_through(&from, &conv) >= MESSAGES as u64,
        )
        .await
        .unwrap();
    let history = hush_client::history(&*bob.storage(), &conv, None, 1000).unwrap();
    let seqs: Vec<u64> = history.iter().map(|e| e.record.sender_seq).collect();
    assert_eq!(
        outcome,
        Outcome::Done,
        "messages acknowledged before they were stored are lost: history has seqs {seqs:?}"
    );
    let texts: Vec<&str> = history.iter().map(|e| e.record.text.as_str()).collect();
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i:02}")).collect();
    assert_eq!(texts, want.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(seqs, (1..=MESSAGES as u64).collect::<Vec<_>>());

    bob.shutdown().await;
    relay.shutdown().await.unwrap();
}
