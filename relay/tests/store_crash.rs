//! Crash injection at the storage level.
//!
//! The test binary re-executes itself as a child process (selected by the
//! `HUSH_STORE_CRASH_CHILD` variable) that commits batches in a loop and
//! prints each outcome only once its commit was answered. The parent kills it with
//! SIGKILL after a random short delay, reopens the file, and checks that every
//! reported envelope is there exactly once with the right bytes and that each
//! inbox is gap-free. Each round's child first retries messages of the
//! previous round, which must come back as duplicates with their original
//! seqs: the dedup table survives the crash along with the inbox.
//!
//! The first test's child commits as the relay's writer does
//! (`Store::commit_then`): each batch's segment sync runs behind its commit
//! while the next batch is committed, and a batch is reported only once it
//! is answered. It also takes checkpoints on a second thread
//! in a loop, as the relay's writer does, so kills also land while a
//! checkpoint holds the index and acknowledged batches are in the segment
//! log alone.
//!
//! A second test does the same with small segments while the child also
//! acknowledges two of the three inboxes after every batch and runs segment
//! compaction between batches, so kills land in the middle of compactions:
//! every envelope of the never-acknowledged inbox (the ones compaction
//! moves) must survive intact.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{ConversationId, DeviceId, DeviceRegistration, MessageId, UserKey};
use hush_relay::store::redb_store::RedbStore;
use hush_relay::store::{CommitOutcome, NewEnvelope, Store, StoreLimits};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "HUSH_STORE_CRASH_CHILD";
const ROUND_ENV: &str = "HUSH_STORE_CRASH_ROUND";
const TEST_NAME: &str = "killed_writer_loses_nothing_it_reported";
const COMPACT_TEST_NAME: &str = "killed_compaction_loses_nothing_unacked";
/// Segment size of the compaction test: a roll every few batches.
const SMALL_SEGMENT: u64 = 2048;
/// The inbox the compaction test never acknowledges.
const KEPT: u64 = 10;
const ROUNDS: u64 = 12;
const RECIPIENTS: u64 = 3;
const BATCH: u64 = 8;
/// Messages of the previous round each child retries first.
const RETRIES: u64 = 12;
/// A child that is never killed stops after this many batches.
const MAX_BATCHES: u64 = 20_000;
/// Longest random delay between the child being ready and the kill.
const MAX_KILL_DELAY_MS: u64 = 60;
/// Shortest delay before a kill in the compaction test.
const MIN_COMPACT_KILL_DELAY_MS: u64 = 40;
/// Pause between the checkpoints of the first test's child.
const CHECKPOINT_EVERY_MS: u64 = 5;
/// Bound on waiting for a child to open the store.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn killed_writer_loses_nothing_it_reported() {
    match std::env::var(CHILD_ENV) {
        Ok(path) => child(Path::new(&path), false),
        Err(_) => parent(false),
    }
}

#[test]
fn killed_compaction_loses_nothing_unacked() {
    match std::env::var(CHILD_ENV) {
        Ok(path) => child(Path::new(&path), true),
        Err(_) => parent(true),
    }
}

fn open(path: &Path, compacting: bool) -> RedbStore {
    if compacting {
        RedbStore::open_with_segment_size(path, StoreLimits::default(), SMALL_SEGMENT).unwrap()
    } else {
        RedbStore::open(path, StoreLimits::default()).unwrap()
    }
}

fn dev(n: u64) -> DeviceId {
    DeviceId([n as u8; 16])
}

fn recipient_of(idx: u64) -> u64 {
    10 + idx % RECIPIENTS
}

/// The envelope bytes of message `idx` of `round`: the pair itself, then a
/// filler of a length and value that depend on it.
fn payload(round: u64, idx: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + 97);
    b.extend_from_slice(&round.to_be_bytes());
    b.extend_from_slice(&idx.to_be_bytes());
    let fill = ((round * 131 + idx) % 251) as u8;
    b.resize(16 + (idx % 97) as usize, fill);
    b
}

fn envelope(round: u64, idx: u64) -> NewEnvelope {
    let bytes = payload(round, idx);
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[..16]);
    NewEnvelope {
        recipient: dev(recipient_of(idx)),
        sender: dev(1),
        message_id: MessageId(id),
        conversation: ConversationId([2; 16]),
        sender_seq: idx + 1,
        bytes,
        expires_at_ms: u64::MAX,
    }
}

fn registration(n: u64) -> DeviceRegistration {
    DeviceRegistration {
        device: dev(n),
        user: UserKey([n as u8; 32]),
        signing_key: [n as u8; 32],
        agreement_key: [n as u8; 32],
        user_signature: [n as u8; 64],
    }
}

// ---- child -------------------------------------------------------------

fn child(path: &Path, compacting: bool) {
    let round: u64 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let store = std::sync::Arc::new(open(path, compacting));
    if !compacting {
        let store = std::sync::Arc::clone(&store);
        std::thread::spawn(move || {
            loop {
                store.checkpoint().unwrap();
                std::thread::sleep(Duration::from_millis(CHECKPOINT_EVERY_MS));
            }
        });
    }
    for r in 0..RECIPIENTS {
        store.register_device(&registration(10 + r), 0).unwrap();
    }
    {
        let mut out = std::io::stdout().lock();
        // Leading newline: the test harness may have left a partial line.
        writeln!(out, "\nREADY").unwrap();
        out.flush().unwrap();
    }
    if round > 0 {
        let idxs: Vec<u64> = (0..RETRIES).collect();
        let batch: Vec<_> = idxs.iter().map(|&i| envelope(round - 1, i)).collect();
        let outcomes = store.commit(&batch).unwrap();
        report(round - 1, &idxs, &outcomes);
    }
    for b in 0..MAX_BATCHES {
        let idxs: Vec<u64> = (b * BATCH..(b + 1) * BATCH).collect();
        let batch: Vec<_> = idxs.iter().map(|&i| envelope(round, i)).collect();
        if compacting {
            let outcomes = store.commit(&batch).unwrap();
            report(round, &idxs, &outcomes);
        } else {
            // As the relay's writer commits: the next batch goes while this
            // one's sync runs behind it, and it is reported once answered.
            store.commit_then(
                batch,
                None,
                Box::new(move |_, outcomes| report(round, &idxs, &outcomes.unwrap())),
            );
        }
        if !compacting {
            writeln!(
                std::io::stdout().lock(),
                "AHEAD {}",
                store.logged_ahead_total()
            )
            .unwrap();
        }
        if compacting {
            for r in 0..RECIPIENTS {
                if 10 + r != KEPT {
                    store.ack(&dev(10 + r), u64::MAX).unwrap();
                }
            }
            let mut steps = 0;
            while store.compact(512).unwrap() {
                steps += 1;
            }
            if steps > 0 {
                writeln!(std::io::stdout().lock(), "COMPACTED {steps}").unwrap();
            }
        }
    }
}

/// Print a batch's outcomes: only once its commit was answered, and
/// flushed at once.
fn report(round: u64, idxs: &[u64], outcomes: &[CommitOutcome]) {
    let mut out = std::io::stdout().lock();
    for (idx, outcome) in idxs.iter().zip(outcomes) {
        let (kind, seq) = match outcome {
            CommitOutcome::Stored { seq } => ("S", *seq),
            CommitOutcome::Duplicate { seq } => ("D", *seq),
            CommitOutcome::Refused(r) => panic!("refused: {r:?}"),
        };
        writeln!(out, "OUT {round} {idx} {kind} {seq}").unwrap();
    }
    out.flush().unwrap();
}

// ---- parent ------------------------------------------------------------

/// A committed outcome the child reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reported {
    duplicate: bool,
    seq: u64,
}

fn parse(line: &str) -> Option<((u64, u64), Reported)> {
    let mut it = line.strip_prefix("OUT ")?.split(' ');
    let round = it.next()?.parse().ok()?;
    let idx = it.next()?.parse().ok()?;
    let duplicate = match it.next()? {
        "S" => false,
        "D" => true,
        _ => return None,
    };
    let seq = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(((round, idx), Reported { duplicate, seq }))
}

/// xorshift64*: enough randomness for kill delays without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Run one child until it is killed; return every complete line it printed
/// and whether it was still running when killed.
fn run_child(
    path: &Path,
    compacting: bool,
    round: u64,
    delay: Duration,
    err_log: &Path,
) -> (Vec<String>, bool) {
    let name = if compacting {
        COMPACT_TEST_NAME
    } else {
        TEST_NAME
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .env(ROUND_ENV, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(err_log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    // A line cut off by the kill has no newline: drop it.
                    if buf.last() == Some(&b'\n')
                        && tx
                            .send(String::from_utf8_lossy(&buf).trim_end().to_owned())
                            .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let mut lines = Vec::new();
    let ready_by = Instant::now() + READY_TIMEOUT;
    loop {
        let left = ready_by.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "READY" => break,
            Ok(line) => lines.push(line),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(err_log).unwrap_or_default();
                panic!("round {round}: child never became ready ({e}); stderr:\n{log}");
            }
        }
    }
    // Let it commit for a random while, collecting what it reports.
    let kill_at = Instant::now() + delay;
    while let Ok(line) = rx.recv_timeout(kill_at.saturating_duration_since(Instant::now())) {
        lines.push(line);
        if Instant::now() >= kill_at {
            break;
        }
    }
    let still_running = child.try_wait().unwrap().is_none();
    if still_running {
        child.kill().unwrap(); // SIGKILL on unix
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    if !still_running {
        let log = std::fs::read_to_string(err_log).unwrap_or_default();
        assert!(
            status.success(),
            "round {round}: child failed: {status}; stderr:\n{log}"
        );
    }
    (lines, still_running)
}

/// Check the reopened file against everything reported so far (with
/// `compacting`, only the never-acknowledged inbox must hold all of it).
/// Check the reopened store; returns how many envelopes its open recovered
/// from the segment log (commits whose index the kill undid).
fn verify(
    path: &Path,
    compacting: bool,
    round: u64,
    reported: &BTreeMap<(u64, u64), Reported>,
) -> u64 {
    let store = open(path, compacting);
    let recovered = store.recovered_at_open();
    // The tables still agree with each other (counters, purge queue, dedup
    // lists) whatever moment the child died at.
    if let Err(e) = store.check_consistency() {
        panic!("round {round}: {e}");
    }
    let mut found: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
    let mut total = 0u64;
    for r in 0..RECIPIENTS {
        let d = dev(10 + r);
        let state = store.inbox_state(&d).unwrap();
        // Acknowledged envelopes are gone (acks are cumulative, and a crash
        // may only undo the last few).
        let mut after = state.acked;
        loop {
            let page = store.pull(&d, after, 200, usize::MAX).unwrap();
            assert_eq!(page.truncated, None);
            for e in &page.envelopes {
                assert_eq!(
                    e.seq,
                    after + 1,
                    "round {round}: gap in inbox {r} before {}",
                    e.seq
                );
                after = e.seq;
                assert!(e.bytes.len() >= 16, "round {round}: short envelope");
                let m_round = u64::from_be_bytes(e.bytes[..8].try_into().unwrap());
                let m_idx = u64::from_be_bytes(e.bytes[8..16].try_into().unwrap());
                assert_eq!(
                    e.bytes,
                    payload(m_round, m_idx),
                    "round {round}: bytes differ"
                );
                assert_eq!(recipient_of(m_idx), 10 + r, "round {round}: wrong inbox");
                let dup = found.insert((m_round, m_idx), (10 + r, e.seq));
                assert_eq!(
                    dup, None,
                    "round {round}: message ({m_round}, {m_idx}) stored twice"
                );
            }
            if page.remaining == 0 {
                break;
            }
        }
        assert_eq!(after, state.head, "round {round}: head of inbox {r}");
        assert_eq!(
            state.depth,
            state.head - state.acked,
            "round {round}: depth of inbox {r}"
        );
        if !compacting || 10 + r == KEPT {
            assert_eq!(state.acked, 0, "round {round}: inbox {r} acked");
        }
        total += state.depth;
    }
    assert_eq!(store.total_depth().unwrap(), total);
    for (&(m_round, m_idx), rep) in reported {
        if compacting && recipient_of(m_idx) != KEPT {
            continue;
        }
        let (inbox, seq) = found
            .get(&(m_round, m_idx))
            .unwrap_or_else(|| panic!("round {round}: reported ({m_round}, {m_idx}) lost"));
        assert_eq!(*inbox, recipient_of(m_idx));
        assert_eq!(*seq, rep.seq, "round {round}: ({m_round}, {m_idx}) moved");
    }
    recovered
}

fn parent(compacting: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed:#x}");
    let mut rng = Rng(seed);
    let mut reported: BTreeMap<(u64, u64), Reported> = BTreeMap::new();
    let mut killed_mid_run = 0;
    let mut duplicates = 0;
    let mut compactions = 0u64;
    let mut recovered = 0u64;
    let mut ahead = 0u64;
    let started = Instant::now();
    for round in 0..ROUNDS {
        // The compaction test's children first need a few segments to fill
        // and roll before there is anything to compact.
        let min = if compacting {
            MIN_COMPACT_KILL_DELAY_MS
        } else {
            0
        };
        let delay = Duration::from_millis(min + rng.next() % (MAX_KILL_DELAY_MS + 1));
        let err_log = dir.path().join(format!("child-{round}.stderr"));
        let (lines, was_running) = run_child(&path, compacting, round, delay, &err_log);
        if was_running {
            killed_mid_run += 1;
        }
        let mut ahead_in_round = 0;
        for line in &lines {
            if let Some(n) = line.strip_prefix("COMPACTED ") {
                compactions += n.parse::<u64>().unwrap();
            }
            if let Some(n) = line.strip_prefix("AHEAD ") {
                ahead_in_round = n.parse::<u64>().unwrap();
            }
            let Some((msg, rep)) = parse(line) else {
                continue;
            };
            match reported.get(&msg) {
                // Reported before: a retry must name the very same seq.
                Some(prev) => {
                    assert!(rep.duplicate, "round {round}: {msg:?} stored twice");
                    assert_eq!(prev.seq, rep.seq, "round {round}: {msg:?} changed seq");
                    duplicates += 1;
                }
                None => {
                    reported.insert(msg, rep);
                }
            }
        }
        ahead += ahead_in_round;
        recovered += verify(&path, compacting, round, &reported);
    }
    eprintln!(
        "crash test: {ROUNDS} rounds in {:?}, {} envelopes reported, {duplicates} retries \
         deduplicated, {killed_mid_run} children killed mid-run, {compactions} compaction \
         steps, {recovered} envelopes recovered from the segment log, {ahead} acknowledged \
         while a checkpoint held the index",
        started.elapsed(),
        reported.len(),
    );
    if compacting {
        assert!(compactions > 0, "no compaction ran");
    }
    assert!(!reported.is_empty(), "no child committed anything");
    if !compacting {
        // Envelope commits sync the segment log, not the index, so a kill
        // undoes the index of the last ones: the opens above must have put
        // them back (and `verify` found every reported one).
        assert!(
            recovered > 0,
            "no kill left anything for the log to recover"
        );
        assert!(
            ahead > 0,
            "no send went to the log alone during a checkpoint"
        );
    }
    assert!(
        killed_mid_run >= ROUNDS / 2,
        "children finished before being killed"
    );
}
