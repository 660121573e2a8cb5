//! The deterministic simulator over many seeds (1,000 by default, then the
//! seeds that once failed outside them; `HUSH_SIM_SEEDS=N` for more or
//! fewer, `HUSH_SIM_SEED=<seed>` to replay one).

use hush_tests::sim;

#[test]
fn simulated_runs_keep_every_invariant() {
    let seeds = sim::seeds(0x4855_5348_5349_4d00, 1_000, &[]);
    let (report, failures) = sim::run_many(&seeds, sim::run);
    for (seed, why) in &failures {
        eprintln!(
            "sim seed {seed} failed: {why}\n  replay: HUSH_SIM_SEED={seed} cargo test -p hush-tests --test sim_seeds"
        );
    }
    eprintln!("sim: {} seeds, {report:?}", seeds.len());
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed",
        failures.len(),
        seeds.len()
    );
    // The faults were real: with this many seeds the repair paths ran.
    if seeds.len() >= 100 {
        assert!(
            report.gaps_detected > 0 && report.recovered > 0,
            "no gap was ever repaired: {report:?}"
        );
        assert!(
            report.duplicates > 0,
            "no duplicate was ever dropped: {report:?}"
        );
        assert!(
            report.crashes > 0 && report.relay_restarts > 0,
            "no crash was injected: {report:?}"
        );
        assert!(
            report.crashes_after_storage > 0,
            "no crash between storage and ack: {report:?}"
        );
        assert!(
            report.crashes_after_early > 0,
            "no crash between an early pull and its step's commit: {report:?}"
        );
        assert!(
            report.early_pushed > 0 && report.early_lost > 0,
            "no early push was ever lost to a relay death before its sync: {report:?}"
        );
        assert!(
            report.durable_forged > 0,
            "no durable claim was ever forged: {report:?}"
        );
        assert!(
            report.probes > 0 && report.resent > 0,
            "no re-send ever happened: {report:?}"
        );
        assert!(
            report.unrecoverable > 0,
            "no sender ever forgot a message: {report:?}"
        );
        assert!(
            report.truncations > 0 && report.out_of_order > 0,
            "{report:?}"
        );
    }
}

/// Group seeds beyond the default 1,000 that once failed:
/// - a member's held copy of an add was asked of its author again, and the
///   author's "unavailable" (its receipt had covered it) dropped it, so a
///   later message by the added user was dropped as a non-member's.
const GROUP_REGRESSIONS: &[u64] = &[273_742_287_997_939_751];

/// Group worlds: several senders, a member added and maybe one removed,
/// under the same faults; one order everywhere, exactly once, nothing after
/// a removal reaches the removed member (`sim::check::check_group`).
#[test]
fn simulated_group_runs_keep_every_invariant() {
    let seeds = sim::seeds(0x4855_5348_4752_5000, 1_000, GROUP_REGRESSIONS);
    let (report, failures) = sim::run_many(&seeds, sim::run_group);
    for (seed, why) in &failures {
        eprintln!(
            "group sim seed {seed} failed: {why}\n  replay: HUSH_SIM_SEED={seed} cargo test -p hush-tests --test sim_seeds simulated_group"
        );
    }
    eprintln!("group sim: {} seeds, {report:?}", seeds.len());
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed",
        failures.len(),
        seeds.len()
    );
    if seeds.len() >= 100 {
        assert!(
            report.group_messages > 0 && report.group_deliveries > 0,
            "{report:?}"
        );
        assert!(
            report.group_held > 0,
            "no group message was ever held: {report:?}"
        );
        assert!(report.group_changes > 0, "{report:?}");
        assert!(report.crashes > 0 && report.gaps_detected > 0, "{report:?}");
    }
}
