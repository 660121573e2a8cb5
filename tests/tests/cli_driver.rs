//! The `hush` native driver under storage failures, against an in-process
//! relay over real QUIC on 127.0.0.1.
//!
//! The recipient's store refuses every third commit while it reads a backlog
//! in small pages (each page's arrival sends the next pull before the page
//! is committed). The driver must then perform nothing more of that step
//! (no ack reaches the relay, no event is shown), rebuild the engine from
//! storage and carry on; the relay redelivers, and every message ends up in
//! the history exactly once, in order — with commits awaited one by one and
//! with commits pipelined. Also: lazy delivery notices, and incoming
//! messages shown once stored but acknowledged only once durable (a power
//! loss in between, `shown_once_stored`).

use hush_cli::driver::{Discard, Driver, Outcome, cli_engine_config, now_ms, os_seed};
use hush_cli::{CertCheck, CliError, RelayTarget};
use hush_client::{
    Command, ContactCode, Engine, MemoryStorage, MessageState, Reply, Storage, StorageError,
    StorageOp,
};
use hush_relay::{Config, RelayHandle, SystemClock};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const MESSAGES: usize = 40;
const BOUND: Duration = Duration::from_secs(30);

/// A store that fails every `every`-th commit once armed.
struct Flaky {
    inner: MemoryStorage,
    armed: bool,
    every: u64,
    applies: u64,
    failures: u64,
}

impl Storage for Flaky {
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        self.inner.scan_prefix(prefix)
    }

    fn scan_back(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        self.inner.scan_back(prefix, before, limit)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(key)
    }

    fn apply(&mut self, batch: &[StorageOp]) -> Result<(), StorageError> {
        if self.armed && !batch.is_empty() {
            self.applies += 1;
            if self.applies.is_multiple_of(self.every) {
                self.failures += 1;
                return Err(StorageError::Backend("injected failure".into()));
            }
        }
        self.inner.apply(batch)
    }
}

async fn settle<S: Storage + Send + 'static>(d: &mut Driver<S>) -> Result<Outcome, CliError> {
    let mut stop = None;
    d.run_until(Instant::now() + BOUND, &mut stop, &mut Discard, |v| {
        v.settled()
    })
    .await
}

async fn device<S: Storage + Send + 'static>(
    storage: S,
    name: &str,
    target: &RelayTarget,
    page_limit: u16,
) -> Result<Driver<S>, CliError> {
    let cfg = hush_client::EngineConfig {
        page_limit,
        ..cli_engine_config()
    };
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

/// A relay on 127.0.0.1 with its store under `dir`, and how to reach it.
#[allow(clippy::unwrap_used)]
async fn start_relay(dir: &std::path::Path) -> (RelayHandle, RelayTarget) {
    let relay = RelayHandle::start(
        Config::default_for(dir.join("relay")),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let target = RelayTarget {
        addr: relay.quic_addr().to_string(),
        cert: CertCheck::Pinned(CertCheck::parse_hash(&relay.cert_sha256_hex()).unwrap()),
        transport: hush_cli::Transport::Quic,
    };
    (relay, target)
}

/// alice adds bob and bob adds alice; returns bob's contact code.
#[allow(clippy::unwrap_used)]
async fn introduce<A, B>(alice: &mut Driver<A>, bob: &mut Driver<B>) -> ContactCode
where
    A: Storage + Send + 'static,
    B: Storage + Send + 'static,
{
    let bob_code = code_named(bob, "bob");
    alice
        .command(
            Command::AddContact {
                code: bob_code.clone(),
            },
            &mut Discard,
        )
        .await
        .unwrap();
    assert_eq!(settle(alice).await.unwrap(), Outcome::Done);
    bob.command(
        Command::AddContact {
            code: code_named(alice, "alice"),
        },
        &mut Discard,
    )
    .await
    .unwrap();
    assert_eq!(settle(bob).await.unwrap(), Outcome::Done);
    bob_code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_rebuild_the_engine_and_lose_or_repeat_nothing() {
    failed_commits(false).await;
}

/// The same with commits pipelined: frames handled while a commit runs
/// belong to steps that are dropped with the engine when it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pipelined_commits_rebuild_the_engine_and_lose_or_repeat_nothing() {
    failed_commits(true).await;
}

// The body of the two tests above (test code: failures are assertions).
#[allow(clippy::unwrap_used, clippy::panic)]
async fn failed_commits(pipelined: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (relay, target) = start_relay(dir.path()).await;
    let mut alice = device(MemoryStorage::new(), "alice", &target, 200)
        .await
        .unwrap();
    let flaky = Flaky {
        inner: MemoryStorage::new(),
        armed: false,
        every: 3,
        applies: 0,
        failures: 0,
    };
    // Small pages: bob's catch-up is many pipelined pulls (early frames).
    let mut bob = device(flaky, "bob", &target, 4).await.unwrap();
    bob.set_pipelined(pipelined);
    let bob_code = introduce(&mut alice, &mut bob).await;

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

    // bob's store now fails every third commit.
    bob.storage_mut().armed = true;
    let from = alice.engine().device_id();
    let conv = bob.engine().conversation_with(&alice.engine().user_key());
    let mut stop = None;
    let outcome = bob
        .run_until(Instant::now() + BOUND, &mut stop, &mut Discard, |v| {
            v.settled() && v.engine.delivered_through(&from, &conv) >= MESSAGES as u64
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Done, "bob did not receive everything");
    assert!(
        bob.storage().failures > 0,
        "the failure injection never fired"
    );
    assert!(bob.stats().rebuilds >= bob.storage().failures);

    let history = hush_client::history(&bob.storage().inner, &conv, None, 1000).unwrap();
    let texts: Vec<&str> = history.iter().map(|e| e.record.text.as_str()).collect();
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i:02}")).collect();
    assert_eq!(texts, want.iter().map(String::as_str).collect::<Vec<_>>());
    let seqs: Vec<u64> = history.iter().map(|e| e.record.sender_seq).collect();
    assert_eq!(seqs, (1..=MESSAGES as u64).collect::<Vec<_>>());

    bob.shutdown().await;
    alice.shutdown().await;
    relay.shutdown().await.unwrap();
}

/// The durable delivery state of the message `id` in `conv`.
fn stored_state(
    storage: &MemoryStorage,
    conv: &hush_protocol::ConversationId,
    id: &hush_protocol::MessageId,
) -> Option<MessageState> {
    hush_client::history(storage, conv, None, 1000)
        .ok()?
        .into_iter()
        .find(|e| e.record.id == *id)
        .and_then(|e| e.state)
}

/// Run `d` in short turns until `until` holds (at most [`BOUND`]).
async fn turn_until<S: Storage + Send + 'static>(
    d: &mut Driver<S>,
    mut until: impl FnMut(&Driver<S>) -> bool,
) -> bool {
    let end = Instant::now() + BOUND;
    let mut stop = None;
    while !until(d) {
        if Instant::now() >= end {
            return false;
        }
        if d.run_until(
            Instant::now() + Duration::from_millis(20),
            &mut stop,
            &mut Discard,
            |_| false,
        )
        .await
        .is_err()
        {
            return false;
        }
    }
    true
}

/// A message's `Stored` notice is lazy: its commit waits for the next send
/// and rides along in that send's commit, and is never shown before it is
/// durable. A crash while it waits loses nothing: the reloaded engine sends
/// the message again, the relay's dedup answers `Stored` again, and the
/// recipient shows it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used, clippy::panic)]
async fn lazy_delivery_notices_join_the_next_commit_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, target) = start_relay(dir.path()).await;
    let mut alice = device(MemoryStorage::new(), "alice", &target, 200)
        .await
        .unwrap();
    let mut bob = device(MemoryStorage::new(), "bob", &target, 200)
        .await
        .unwrap();
    let bob_code = introduce(&mut alice, &mut bob).await;
    // bob offline: no receipts, only the relay's answers reach alice.
    bob.shutdown().await;
    alice.set_lazy_commit(Duration::from_secs(3600));
    let conversation = alice.engine().conversation_with(&bob_code.user);
    let send = |text: &str| Command::SendText {
        conversation,
        text: text.into(),
    };
    let id_of = |r: Option<Reply>| match r {
        Some(Reply::Message(id)) => id,
        other => panic!("unexpected reply {other:?}"),
    };

    // m0's Stored notice is handled but waits, neither durable nor shown.
    let m0 = id_of(alice.command(send("m0"), &mut Discard).await.unwrap());
    assert!(turn_until(&mut alice, |d| d.lazy_pending() > 0).await);
    assert_eq!(
        alice.engine().message_state(&m0),
        Some(MessageState::Stored)
    );
    assert_eq!(
        stored_state(&alice.storage(), &conversation, &m0),
        Some(MessageState::Sending)
    );
    // The next send's commit takes it along: one commit for both.
    let commits = alice.stats().commits;
    let m1 = id_of(alice.command(send("m1"), &mut Discard).await.unwrap());
    assert_eq!(alice.stats().commits, commits + 1);
    assert_eq!(alice.lazy_pending(), 0);
    assert_eq!(
        stored_state(&alice.storage(), &conversation, &m0),
        Some(MessageState::Stored)
    );

    // A caller waiting for the state gets it durable at once.
    let mut stop = None;
    let outcome = alice
        .run_until(Instant::now() + BOUND, &mut stop, &mut Discard, |v| {
            v.engine.message_state(&m1) == Some(MessageState::Stored)
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(
        stored_state(&alice.storage(), &conversation, &m1),
        Some(MessageState::Stored)
    );

    // m2's notice waits when alice's process dies.
    let m2 = id_of(alice.command(send("m2"), &mut Discard).await.unwrap());
    assert!(turn_until(&mut alice, |d| d.lazy_pending() > 0).await);
    let storage = alice.into_storage().unwrap();
    assert_eq!(
        stored_state(&storage, &conversation, &m2),
        Some(MessageState::Sending)
    );
    let cfg = hush_client::EngineConfig {
        page_limit: 200,
        ..cli_engine_config()
    };
    let mut alice = Driver::load(storage, cfg, target.clone()).unwrap();
    let mut stop = None;
    let outcome = alice
        .run_until(Instant::now() + BOUND, &mut stop, &mut Discard, |v| {
            v.settled() && v.engine.message_state(&m2) == Some(MessageState::Stored)
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(
        stored_state(&alice.storage(), &conversation, &m2),
        Some(MessageState::Stored)
    );

    // bob gets each message once, in order.
    let mut bob = Driver::load(
        bob.into_storage().unwrap(),
        hush_client::EngineConfig {
            page_limit: 200,
            ..cli_engine_config()
        },
        target.clone(),
    )
    .unwrap();
    let from = alice.engine().device_id();
    let conv = bob.engine().conversation_with(&alice.engine().user_key());
    let mut stop = None;
    let outcome = bob
        .run_until(Instant::now() + BOUND, &mut stop, &mut Discard, |v| {
            v.settled() && v.engine.delivered_through(&from, &conv) >= 3
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Done);
    let history = hush_client::history(&*bob.storage(), &conv, None, 1000).unwrap();
    let texts: Vec<&str> = history.iter().map(|e| e.record.text.as_str()).collect();
    assert_eq!(texts, ["m0", "m1", "m2"]);

    bob.shutdown().await;
    alice.shutdown().await;
    relay.shutdown().await.unwrap();
}

mod shown_once_stored {
    //! The native driver shows an incoming message once it is stored and
    //! acknowledges it to the relay only once it is durable, against an
    //! in-process relay over real QUIC on 127.0.0.1.
    //!
    //! bob's store holds back the sync of the batch that stores alice's
    //! message until bob's app has been shown that message, then reports the
    //! sync as failed and forgets the batch, as a power loss between the write
    //! and the sync would. The message must have been shown while its sync was
    //! still open, readable from the store at that moment; the relay, never
    //! acknowledged, must deliver it again, and bob must end with it in his
    //! history once. alice's send, which nothing would bring back, is answered
    //! only after her sync ended.

    use super::{BOUND, device, introduce, settle, start_relay};
    use hush_cli::CliError;
    use hush_cli::driver::{Batch, Discard, Driver, Outcome, Sink};
    use hush_client::{
        Command, Event, MemoryStorage, MessageState, Reply, Storage, StorageError, StorageOp,
        Syncing,
    };
    use hush_protocol::ConversationId;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
    use std::time::Duration;
    use tokio::time::Instant;

    /// Holds back the sync of one batch that stores a history record.
    struct Gate {
        /// Gate the next such batch.
        armed: AtomicBool,
        /// The gated sync waits at most this long for a release.
        hold: Duration,
        /// A release fails the gated sync (a power loss before it).
        release: Mutex<Option<mpsc::Receiver<()>>>,
        /// The gated sync ended without a release, after `hold`.
        held_out: AtomicBool,
        /// Gated syncs that failed.
        failed: AtomicU64,
    }

    impl Gate {
        fn new(hold: Duration, release: Option<mpsc::Receiver<()>>) -> Arc<Gate> {
            Arc::new(Gate {
                armed: AtomicBool::new(false),
                hold,
                release: Mutex::new(release),
                held_out: AtomicBool::new(false),
                failed: AtomicU64::new(0),
            })
        }
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A memory store whose gated batch is stored at once and durable (or
    /// lost) only when its gate says.
    struct Gated {
        inner: Arc<Mutex<MemoryStorage>>,
        gate: Arc<Gate>,
        /// Store without waiting where asked (`try_apply_stored`), as the
        /// native file store does, so that the driver stores on its task.
        inline: bool,
    }

    impl Storage for Gated {
        fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
            lock(&self.inner).scan_prefix(prefix)
        }

        fn scan_back(
            &self,
            prefix: &[u8],
            before: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
            lock(&self.inner).scan_back(prefix, before, limit)
        }

        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
            lock(&self.inner).get(key)
        }

        fn apply(&mut self, batch: &[StorageOp]) -> Result<(), StorageError> {
            lock(&self.inner).apply(batch)
        }

        fn try_apply_stored(
            &mut self,
            batch: &[StorageOp],
        ) -> Option<Result<Syncing, StorageError>> {
            self.inline.then(|| self.apply_stored(batch))
        }

        fn apply_stored(&mut self, batch: &[StorageOp]) -> Result<Syncing, StorageError> {
            let history = batch
                .iter()
                .any(|op| op.key().starts_with(hush_client::storage::keys::HISTORY));
            if !history || !self.gate.armed.swap(false, Ordering::SeqCst) {
                return self.apply(batch).map(|()| Syncing::done());
            }
            let before = lock(&self.inner).clone();
            lock(&self.inner).apply(batch)?;
            let inner = Arc::clone(&self.inner);
            let gate = Arc::clone(&self.gate);
            Ok(Syncing::new(move || {
                let released = match lock(&gate.release).take() {
                    Some(release) => release.recv_timeout(gate.hold).is_ok(),
                    None => {
                        std::thread::sleep(gate.hold);
                        false
                    }
                };
                if !released {
                    gate.held_out.store(true, Ordering::SeqCst);
                    return Ok(());
                }
                *lock(&inner) = before;
                gate.failed.fetch_add(1, Ordering::SeqCst);
                Err(StorageError::Backend(
                    "injected power loss before the sync".into(),
                ))
            }))
        }
    }

    /// What an app was shown of one message.
    #[derive(Debug)]
    struct Seen {
        text: String,
        outgoing: bool,
        /// The gated sync had ended when it was shown.
        sync_over: bool,
        /// The store held it when it was shown.
        readable: bool,
    }

    /// Records every message shown; releases the gate at the first incoming one.
    struct Watch {
        gate: Arc<Gate>,
        conversation: ConversationId,
        release: Option<mpsc::Sender<()>>,
        seen: Vec<Seen>,
    }

    impl Sink<Gated> for Watch {
        fn batch(&mut self, b: Batch<'_, Gated>) -> Result<(), CliError> {
            for e in b.events {
                if let Event::Message(record) = e {
                    let history = hush_client::history(&*b.storage, &self.conversation, None, 100)?;
                    self.seen.push(Seen {
                        text: record.text.clone(),
                        outgoing: record.outgoing,
                        sync_over: self.gate.held_out.load(Ordering::SeqCst)
                            || self.gate.failed.load(Ordering::SeqCst) > 0,
                        readable: history.iter().any(|h| h.record.id == record.id),
                    });
                    if !record.outgoing
                        && let Some(tx) = self.release.take()
                    {
                        let _ = tx.send(());
                    }
                }
            }
            Ok(())
        }
    }

    /// A device on a gated store; also returns the store's contents.
    async fn gated(
        name: &str,
        target: &hush_cli::RelayTarget,
        gate: &Arc<Gate>,
        inline: bool,
    ) -> Result<(Driver<Gated>, Arc<Mutex<MemoryStorage>>), CliError> {
        let inner = Arc::new(Mutex::new(MemoryStorage::new()));
        let storage = Gated {
            inner: Arc::clone(&inner),
            gate: Arc::clone(gate),
            inline,
        };
        Ok((device(storage, name, target, 200).await?, inner))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_is_shown_once_stored_and_acknowledged_only_once_durable() {
        shown_once_stored_then_lost(false).await;
    }

    /// The same, with bob's store storing on the driver's task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stored_on_the_drivers_task_likewise() {
        shown_once_stored_then_lost(true).await;
    }

    #[allow(clippy::unwrap_used, clippy::panic)]
    async fn shown_once_stored_then_lost(inline: bool) {
        let dir = tempfile::tempdir().unwrap();
        let (relay, target) = start_relay(dir.path()).await;
        // alice's gated sync is never released: it ends after its hold.
        let alice_gate = Gate::new(Duration::from_millis(300), None);
        // bob's waits (up to 10 s) for his app to be shown the message.
        let (release_tx, release_rx) = mpsc::channel();
        let bob_gate = Gate::new(Duration::from_secs(10), Some(release_rx));
        let (mut alice, _) = gated("alice", &target, &alice_gate, inline).await.unwrap();
        let (mut bob, bob_store) = gated("bob", &target, &bob_gate, inline).await.unwrap();
        let bob_code = introduce(&mut alice, &mut bob).await;

        let conversation = alice.engine().conversation_with(&bob_code.user);
        alice_gate.armed.store(true, Ordering::SeqCst);
        bob_gate.armed.store(true, Ordering::SeqCst);
        let reply = alice
            .command(
                Command::SendText {
                    conversation,
                    text: "kept through a power loss".into(),
                },
                &mut Discard,
            )
            .await
            .unwrap();
        // The sync was held for its whole hold: the reply came after it.
        assert!(
            alice_gate.held_out.load(Ordering::SeqCst),
            "alice's send was answered before her store was durable"
        );
        let Some(Reply::Message(id)) = reply else {
            panic!("no message id");
        };
        let mut stop = None;
        let outcome = alice
            .run_until(Instant::now() + BOUND, &mut stop, &mut Discard, |v| {
                v.engine.message_state(&id) == Some(MessageState::Stored)
            })
            .await
            .unwrap();
        assert_eq!(
            outcome,
            Outcome::Done,
            "the relay never stored alice's message"
        );

        // bob: shown at once, then the batch is lost; the relay delivers again.
        let mut bob_watch = Watch {
            gate: Arc::clone(&bob_gate),
            conversation,
            release: Some(release_tx),
            seen: Vec::new(),
        };
        let end = Instant::now() + BOUND;
        let mut stop = None;
        while bob_watch.seen.len() < 2 && Instant::now() < end {
            bob.run_until(
                Instant::now() + Duration::from_millis(50),
                &mut stop,
                &mut bob_watch,
                |_| false,
            )
            .await
            .unwrap();
        }
        assert_eq!(settle(&mut bob).await.unwrap(), Outcome::Done);
        assert!(
            !bob_gate.held_out.load(Ordering::SeqCst),
            "bob was shown the message only after its sync (or never)"
        );
        assert_eq!(bob_gate.failed.load(Ordering::SeqCst), 1);
        // A store that does not offer it is never stored into on the
        // driver's task; one that does is, for bob's incoming message.
        assert_eq!(bob.stats().stored_inline > 0, inline);
        if !inline {
            assert_eq!(alice.stats().stored_inline, 0);
        }
        assert!(bob.stats().rebuilds >= 1, "the failed sync was not noticed");
        let texts: Vec<&str> = bob_watch.seen.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            texts,
            ["kept through a power loss", "kept through a power loss"],
            "shown before the loss, and again once the relay delivered it again"
        );
        let first = &bob_watch.seen[0];
        assert!(
            !first.outgoing && first.readable && !first.sync_over,
            "{first:?}"
        );
        assert!(bob_watch.seen[1].readable);
        let history = hush_client::history(&*lock(&bob_store), &conversation, None, 100).unwrap();
        let kept: Vec<&str> = history.iter().map(|h| h.record.text.as_str()).collect();
        assert_eq!(kept, ["kept through a power loss"]);

        bob.shutdown().await;
        alice.shutdown().await;
        relay.shutdown().await.unwrap();
    }
}
