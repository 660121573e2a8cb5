//! Durability under `kill -9`: concurrent senders keep sending while the
//! relay process is killed at random moments and restarted on the same data
//! directory. Senders reconnect and retry every unacknowledged envelope with
//! its original message id, like a real client's outbox.
//!
//! Checked at the end, by draining every inbox:
//! - every envelope whose `Stored` ack reached a client is there, once, at the
//!   seq the ack named, byte for byte as sent;
//! - relay seqs are contiguous from 1, message ids unique (retries never
//!   duplicated anything), and each sender's seqs per conversation come out
//!   complete and in order;
//! - after a clean stop, the data directory passes the store's consistency
//!   check (index rows, counters and envelope segment files agree).
//!
//! The seed is printed; `HUSH_TEST_SEED=<seed>` replays the same kill
//! schedule and traffic shape.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{Delivered, DeviceId, Envelope, ErrorCode, MessageId, SendOutcome};
use hush_tests::chaos::{KillPlan, RelayState, kill_restart_loop, relay_state_channel};
use hush_tests::{
    ConnectOptions, DeviceIdentity, HarnessError, RelayProcess, SeededRng, TestDevice,
    conversation, make_envelope_sized, within,
};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const SENDERS: usize = 8;
const RECIPIENTS: usize = 3;
const KILLS: u32 = 20;
/// Envelopes one sender creates at most (keeps the final drain cheap).
const MAX_PER_SENDER: u64 = 10_000;
/// Everything, kills included, must finish within this.
const TEST_BOUND: Duration = Duration::from_secs(90);
/// After the last kill, senders must get all their pending envelopes acked within this.
const FLUSH_BOUND: Duration = Duration::from_secs(30);

/// What a client was told about one envelope.
#[derive(Debug, Clone)]
struct Acked {
    recipient: DeviceId,
    seq: u64,
    envelope: Envelope,
}

#[derive(Default)]
struct Ledger {
    acked: HashMap<MessageId, Acked>,
    violations: Vec<String>,
    duplicates_reported: u64,
    retried_batches: u64,
    reconnects: u64,
}

fn options() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(2),
        ..ConnectOptions::default()
    }
}

/// Connect and authenticate to the relay announced in `state`, giving up
/// (returning `None`) if the relay dies meanwhile or the attempt fails.
async fn connect(
    id: &DeviceIdentity,
    state: &mut watch::Receiver<RelayState>,
) -> Option<TestDevice> {
    let Some(target) = state.borrow_and_update().target else {
        // Down: wait for the next change (bounded by the test's own bound).
        let _ = within(Duration::from_secs(10), "relay restart", state.changed()).await;
        return None;
    };
    let attempt = async {
        let mut dev = TestDevice::connect_with(id, target, options()).await?;
        dev.auth().await?;
        Ok::<_, HarnessError>(dev)
    };
    tokio::select! {
        res = attempt => res.ok(),
        _ = state.changed() => None,
    }
}

struct Sender {
    index: usize,
    id: DeviceIdentity,
    recipients: Vec<DeviceIdentity>,
    rng: SeededRng,
    next_seq: Vec<u64>,
    created: u64,
    pending: VecDeque<Envelope>,
}

impl Sender {
    fn refill(&mut self) {
        let count = self.rng.range(1, 8);
        for _ in 0..count {
            if self.created >= MAX_PER_SENDER {
                return;
            }
            let r = self.rng.range(0, RECIPIENTS as u64 - 1) as usize;
            self.next_seq[r] += 1;
            let len = self.rng.range(120, 600) as usize;
            let fill = self.rng.next_u64() as u8;
            let env = make_envelope_sized(
                self.id.device(),
                self.recipients[r].device(),
                conversation(self.index as u64 + 1),
                self.next_seq[r],
                len,
                fill,
            );
            self.pending.push_back(env);
            self.created += 1;
        }
    }

    /// Record the outcomes of `batch`; returns how many leading envelopes
    /// are settled (stored) and may leave the outbox.
    fn settle(
        &mut self,
        batch: &[Envelope],
        outcomes: &[SendOutcome],
        ledger: &Mutex<Ledger>,
    ) -> usize {
        let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
        if outcomes.len() != batch.len() {
            ledger.violations.push(format!(
                "sender {}: {} outcomes for {} envelopes",
                self.index,
                outcomes.len(),
                batch.len()
            ));
            return 0;
        }
        // Only a stored prefix leaves the outbox, so order is kept on retry.
        let mut settled = 0;
        let mut prefix = true;
        for (env, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                SendOutcome::Stored {
                    message_id,
                    recipient,
                    seq,
                    duplicate,
                } => {
                    if *message_id != env.header.message_id
                        || *recipient != env.header.recipient_device
                    {
                        ledger
                            .violations
                            .push(format!("outcome for the wrong envelope: {outcome:?}"));
                    }
                    if *duplicate {
                        ledger.duplicates_reported += 1;
                    }
                    let entry = Acked {
                        recipient: *recipient,
                        seq: *seq,
                        envelope: env.clone(),
                    };
                    if let Some(previous) = ledger.acked.get(message_id).map(|p| p.seq) {
                        if previous != *seq {
                            ledger.violations.push(format!(
                                "message {message_id} acked at seq {previous} and later at seq {seq}"
                            ));
                        }
                    } else {
                        ledger.acked.insert(*message_id, entry);
                    }
                    if prefix {
                        settled += 1;
                    }
                }
                SendOutcome::Refused { error, .. } if error.code == ErrorCode::Internal => {
                    prefix = false;
                }
                SendOutcome::Refused { error, .. } => {
                    prefix = false;
                    ledger
                        .violations
                        .push(format!("sender {}: unexpected refusal {error}", self.index));
                }
            }
        }
        settled
    }

    async fn run(
        mut self,
        mut state: watch::Receiver<RelayState>,
        mut stop: watch::Receiver<bool>,
        ledger: Arc<Mutex<Ledger>>,
    ) {
        let mut conn: Option<TestDevice> = None;
        let mut last_failed = false;
        loop {
            let stopping = *stop.borrow();
            if self.pending.is_empty() {
                if stopping {
                    break;
                }
                self.refill();
                if self.pending.is_empty() {
                    // Quota of envelopes used up: wait for the end of the chaos.
                    let _ = stop.changed().await;
                    continue;
                }
            }
            let Some(dev) = conn.as_mut() else {
                conn = connect(&self.id, &mut state).await;
                if conn.is_some() {
                    ledger.lock().unwrap_or_else(|e| e.into_inner()).reconnects += 1;
                }
                continue;
            };
            let batch: Vec<Envelope> = self.pending.iter().take(32).cloned().collect();
            if last_failed {
                ledger
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retried_batches += 1;
            }
            let result = tokio::select! {
                res = dev.send(batch.clone()) => Some(res),
                _ = state.changed() => None,
            };
            match result {
                Some(Ok(outcomes)) => {
                    let settled = self.settle(&batch, &outcomes, &ledger);
                    last_failed = settled < batch.len();
                    self.pending.drain(..settled);
                }
                Some(Err(_)) | None => {
                    // Relay died (or is about to): retry the same envelopes
                    // with the same ids on a new connection.
                    conn = None;
                    last_failed = true;
                }
            }
        }
    }
}

fn check_inbox(
    recipient: &DeviceIdentity,
    inbox: &[Delivered],
    acked: &HashMap<MessageId, Acked>,
    problems: &mut Vec<String>,
) {
    let name = recipient.device();
    for (i, d) in inbox.iter().enumerate() {
        if d.seq != i as u64 + 1 {
            problems.push(format!("inbox {name}: position {i} holds seq {}", d.seq));
            break;
        }
    }
    let mut seen = HashMap::new();
    let mut per_stream: HashMap<(DeviceId, [u8; 16]), Vec<u64>> = HashMap::new();
    for d in inbox {
        let h = &d.envelope.header;
        if let Some(first) = seen.insert(h.message_id, d.seq) {
            problems.push(format!(
                "inbox {name}: message {} stored twice (seqs {first} and {})",
                h.message_id, d.seq
            ));
        }
        per_stream
            .entry((h.sender_device, h.conversation_id.0))
            .or_default()
            .push(h.sender_seq);
        match acked.get(&h.message_id) {
            None => problems.push(format!(
                "inbox {name}: seq {} holds message {} no client saw acked",
                d.seq, h.message_id
            )),
            Some(a) if a.seq != d.seq || a.envelope != d.envelope => problems.push(format!(
                "inbox {name}: message {} acked at seq {} but found at {} (same bytes: {})",
                h.message_id,
                a.seq,
                d.seq,
                a.envelope == d.envelope
            )),
            Some(_) => {}
        }
    }
    for ((sender, _), seqs) in &per_stream {
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        if *seqs != expected {
            problems.push(format!(
                "inbox {name}: sender {sender} seqs out of order or with gaps: first few {:?}",
                &seqs[..seqs.len().min(20)]
            ));
        }
    }
    for (message_id, a) in acked {
        if a.recipient == name && !seen.contains_key(message_id) {
            problems.push(format!(
                "inbox {name}: acked message {message_id} (seq {}) is missing",
                a.seq
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_envelopes_survive_repeated_kill_9() {
    let seed = SeededRng::seed_from_env();
    println!("relay crash test seed {seed} (replay: HUSH_TEST_SEED={seed})");
    // Building the relay (on a fresh checkout) is not part of the bound.
    hush_tests::bin_path("hush-relay").expect("relay binary");
    within(TEST_BOUND, "the whole crash test", crash_test(seed))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}

async fn crash_test(seed: u64) {
    let mut rng = SeededRng::new(seed);
    let mut relay = RelayProcess::spawn_temp(&["--send-rate", "0"])
        .await
        .expect("relay starts");

    let recipients: Vec<DeviceIdentity> = (0..RECIPIENTS)
        .map(|i| DeviceIdentity::from_seed(seed.wrapping_add(1000 + i as u64)))
        .collect();
    let senders: Vec<DeviceIdentity> = (0..SENDERS)
        .map(|i| DeviceIdentity::from_seed(seed.wrapping_add(2000 + i as u64)))
        .collect();
    for id in recipients.iter().chain(&senders) {
        TestDevice::register_new(id, relay.target())
            .await
            .expect("register before the chaos")
            .close();
    }

    let (state_tx, state_rx) = relay_state_channel(&relay);
    let (stop_tx, stop_rx) = watch::channel(false);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut tasks = Vec::new();
    for (index, id) in senders.iter().enumerate() {
        let sender = Sender {
            index,
            id: id.clone(),
            recipients: recipients.clone(),
            rng: SeededRng::new(rng.next_u64()),
            next_seq: vec![0; RECIPIENTS],
            created: 0,
            pending: VecDeque::new(),
        };
        tasks.push(tokio::spawn(sender.run(
            state_rx.clone(),
            stop_rx.clone(),
            Arc::clone(&ledger),
        )));
    }

    let plan = KillPlan {
        kills: KILLS,
        min_uptime: Duration::from_millis(50),
        max_uptime: Duration::from_millis(400),
    };
    let stats = kill_restart_loop(&mut relay, &mut rng, plan, &state_tx)
        .await
        .unwrap_or_else(|e| panic!("kill/restart loop: {e}\n{}", relay.log_tail(30)));
    let acked_during_chaos = ledger.lock().unwrap().acked.len();
    let _ = stop_tx.send(true);
    within(
        FLUSH_BOUND,
        "senders to get every pending envelope acked",
        async {
            for t in tasks {
                t.await.expect("sender task");
            }
        },
    )
    .await
    .unwrap();

    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .expect("senders are done")
        .into_inner()
        .unwrap();
    println!(
        "kills {} (port changes {}), slowest restart {:?}, acked during chaos {}, acked total {}, \
         duplicate acks {}, retried batches {}, connections {}",
        stats.kills,
        stats.port_changes,
        stats.slowest_restart,
        acked_during_chaos,
        ledger.acked.len(),
        ledger.duplicates_reported,
        ledger.retried_batches,
        ledger.reconnects
    );
    assert_eq!(stats.kills, KILLS);
    assert!(ledger.violations.is_empty(), "{:#?}", ledger.violations);
    assert!(
        acked_during_chaos > 0,
        "senders made progress between kills"
    );

    let mut problems = Vec::new();
    let mut total = 0;
    for r in &recipients {
        let mut dev = TestDevice::login(r, relay.target())
            .await
            .expect("recipient logs in");
        let inbox = dev.read_inbox(0).await.expect("drain inbox");
        total += inbox.len();
        check_inbox(r, &inbox, &ledger.acked, &mut problems);
    }
    assert!(problems.is_empty(), "seed {seed}: {problems:#?}");
    assert_eq!(
        total,
        ledger.acked.len(),
        "every acked envelope is in some inbox, once"
    );

    // The data directory the kills left behind, checked at rest: the index
    // rows, the counters and the envelope segments agree (every row points
    // at a checked record inside a segment's committed part, live counts
    // match), after recovery cut off whatever the last kill left unfinished.
    let status = relay.terminate().await.expect("SIGTERM");
    assert!(status.success(), "{status}");
    let db = relay.data_dir().join(hush_relay::server::DB_FILE);
    let store = hush_relay::store::redb_store::RedbStore::open(
        &db,
        hush_relay::store::StoreLimits::default(),
    )
    .expect("the store opens after the crash test");
    assert!(store.segment_dir().is_dir());
    store
        .check_consistency()
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}

/// A device connected when the relay was killed learns of the restart from
/// its next packet: the restarted relay keeps its stateless-reset key in the
/// data directory, so it answers the unknown connection with a reset the
/// device can verify. Without the kept key the device could only wait out
/// its idle timeout (60 s here), and would see `TimedOut`, not `Reset`.
#[tokio::test]
async fn a_device_of_a_killed_relay_is_reset_by_the_restarted_one() {
    let mut relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let key_file = relay
        .data_dir()
        .join(hush_relay::server::quic::RESET_KEY_FILE);
    let key = std::fs::read(&key_file).unwrap();
    assert_eq!(key.len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
    }
    let options = ConnectOptions {
        idle_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(60),
        ..ConnectOptions::default()
    };
    let id = DeviceIdentity::from_seed(70);
    let mut dev = TestDevice::connect_with(&id, relay.target(), options)
        .await
        .unwrap();
    dev.register().await.unwrap();
    let addr = relay.quic_addr();
    relay.restart().await.unwrap();
    assert_eq!(relay.quic_addr(), addr, "restarted on the same port");
    assert_eq!(std::fs::read(&key_file).unwrap(), key, "the same key");
    // The next packet reaches the new process, which resets the connection.
    let bound = Duration::from_secs(20);
    let t0 = std::time::Instant::now();
    let pinged = within(bound, "a ping to the restarted relay", dev.ping()).await;
    assert!(
        !matches!(pinged, Ok(Ok(_))),
        "answered on a dead connection"
    );
    let reason = dev.closed(bound).await.unwrap();
    eprintln!("reset noticed after {:?}", t0.elapsed());
    assert!(
        matches!(reason, quinn::ConnectionError::Reset),
        "closed by {reason:?}, not by a reset"
    );
    // And it gets in again at once.
    let mut back = TestDevice::login(&id, relay.target()).await.unwrap();
    back.ping().await.unwrap();
}
