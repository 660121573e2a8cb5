//! The deterministic simulator: several users with several devices each,
//! real [`hush_client::Engine`]s and the relay's real request logic
//! ([`hush_relay::core::RelayCore`] over a [`hush_relay::store::memory::MemoryStore`]),
//! driven through a simulated network with virtual time.
//!
//! One `u64` seed decides everything: the scenario (users, devices, faults,
//! workload), every latency, every fault and every engine's RNG seed, so a
//! failing seed replays bit for bit with `HUSH_SIM_SEED=<seed>`.
//!
//! Faults: connection cuts (in-flight frames vanish), envelopes withheld,
//! duplicated or reordered by the relay inside pages and pushes, relay
//! restarts that lose every commit not yet made durable, client crashes that
//! lose everything not yet stored (before or after a step's storage batch),
//! devices going offline for minutes, and retention expiry with virtual time.
//!
//! After the fault phase the network heals, failed messages are retried as a
//! user would, and the world runs until quiet. Then [`check`] verifies the
//! invariants (see its docs).

mod check;
mod world;

pub use check::Violation;
pub use world::{GroupPlan, GroupSent, Scenario, World};

use crate::rng::SeededRng;

/// What a run produced (for reporting and for tests that want numbers).
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Text messages the workload sent.
    pub messages: usize,
    /// Messages that reached `Stored` at their sender.
    pub stored: usize,
    /// Message deliveries verified (message × device).
    pub deliveries: usize,
    /// Deliveries accounted as unrecoverable (sender lost them too).
    pub unrecoverable: u64,
    /// Gaps detected across all devices.
    pub gaps_detected: u64,
    /// Gaps recovered across all devices.
    pub recovered: u64,
    /// Duplicates dropped across all devices.
    pub duplicates: u64,
    /// Out-of-order arrivals across all devices.
    pub out_of_order: u64,
    /// Client crashes injected.
    pub crashes: u64,
    /// …of which right after a step's storage batch, before its frames.
    pub crashes_after_storage: u64,
    /// …of which right after a step's early frames (the next page's pull),
    /// before its storage batch.
    pub crashes_after_early: u64,
    /// Stream items re-sent (resend requests and tail probes).
    pub resent: u64,
    /// Tail probes sent.
    pub probes: u64,
    /// Relay restarts injected.
    pub relay_restarts: u64,
    /// Envelopes the relay pushed early (written, not yet synced).
    pub early_pushed: u64,
    /// …of which the relay died before their commit's sync, so its restart
    /// gave their seqs to other envelopes.
    pub early_lost: u64,
    /// `Durable` notices the relay forged to claim more than it had synced.
    pub durable_forged: u64,
    /// Envelopes the relay withheld (fault injection).
    pub withheld: u64,
    /// Truncated pages seen.
    pub truncations: u64,
    /// Simulated events processed.
    pub events: u64,
    /// Group messages sent.
    pub group_messages: usize,
    /// Group message deliveries verified (message × device).
    pub group_deliveries: usize,
    /// Group messages that were held for a predecessor.
    pub group_held: u64,
    /// Group predecessors asked of their author.
    pub group_refs_requested: u64,
    /// Group membership changes seen (GroupChanged events).
    pub group_changes: u64,
}

/// Run one seed: build the scenario, run it, check the invariants.
pub fn run(seed: u64) -> Result<Report, Violation> {
    let scenario = Scenario::from_seed(seed);
    let mut world = World::new(seed, scenario)?;
    world.run()?;
    check::check(&world)
}

/// Run one group seed (see [`Scenario::group_from_seed`]).
pub fn run_group(seed: u64) -> Result<Report, Violation> {
    let scenario = Scenario::group_from_seed(seed);
    let mut world = World::new(seed, scenario)?;
    world.run()?;
    check::check(&world)
}

/// The seeds a test should run: `HUSH_SIM_SEED=<seed>` replays one seed;
/// otherwise `HUSH_SIM_SEEDS=<n>` (default `default_count`) seeds derived
/// from `base`, followed by `regressions`: seeds outside the default set
/// that once failed, kept so every run replays them.
pub fn seeds(base: u64, default_count: u64, regressions: &[u64]) -> Vec<u64> {
    if let Some(seed) = std::env::var("HUSH_SIM_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("HUSH_SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default_count);
    let mut rng = SeededRng::new(base);
    let mut seeds: Vec<u64> = (0..count).map(|_| rng.next_u64()).collect();
    for seed in regressions {
        if !seeds.contains(seed) {
            seeds.push(*seed);
        }
    }
    seeds
}

/// Run `seeds` on every core; return the failures (seed, what failed) and a
/// summed report. Each failure names the seed to replay.
pub fn run_many(
    seeds: &[u64],
    run_one: fn(u64) -> Result<Report, Violation>,
) -> (Report, Vec<(u64, String)>) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|i| seeds.iter().skip(i).step_by(threads).copied().collect())
        .collect();
    let results: Vec<(Report, Vec<(u64, String)>)> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    let mut total = Report::default();
                    let mut failures = Vec::new();
                    for seed in chunk {
                        match std::panic::catch_unwind(|| run_one(seed)) {
                            Ok(Ok(r)) => add(&mut total, &r),
                            Ok(Err(v)) => failures.push((seed, v.to_string())),
                            Err(_) => failures.push((seed, "panicked".into())),
                        }
                    }
                    (total, failures)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (Report::default(), vec![(0, "thread died".into())]))
            })
            .collect()
    });
    let mut total = Report::default();
    let mut failures = Vec::new();
    for (r, f) in results {
        add(&mut total, &r);
        failures.extend(f);
    }
    failures.sort();
    (total, failures)
}

fn add(total: &mut Report, r: &Report) {
    total.messages += r.messages;
    total.stored += r.stored;
    total.deliveries += r.deliveries;
    total.unrecoverable += r.unrecoverable;
    total.gaps_detected += r.gaps_detected;
    total.recovered += r.recovered;
    total.duplicates += r.duplicates;
    total.out_of_order += r.out_of_order;
    total.crashes += r.crashes;
    total.crashes_after_storage += r.crashes_after_storage;
    total.crashes_after_early += r.crashes_after_early;
    total.resent += r.resent;
    total.probes += r.probes;
    total.relay_restarts += r.relay_restarts;
    total.early_pushed += r.early_pushed;
    total.early_lost += r.early_lost;
    total.durable_forged += r.durable_forged;
    total.withheld += r.withheld;
    total.truncations += r.truncations;
    total.events += r.events;
    total.group_messages += r.group_messages;
    total.group_deliveries += r.group_deliveries;
    total.group_held += r.group_held;
    total.group_refs_requested += r.group_refs_requested;
    total.group_changes += r.group_changes;
}
