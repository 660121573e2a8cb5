//! Fault injection at the process level: kill the relay with SIGKILL at
//! random moments and bring it back on the same data directory.
//!
//! Clients learn about every death and rebirth through a `watch` channel of
//! [`RelayState`]: a real client would notice through its idle timeout a
//! second later; telling it at once keeps crash tests short without changing
//! what is being tested (what the relay kept after `kill -9`).

use crate::Result;
use crate::device::RelayTarget;
use crate::process::RelayProcess;
use crate::rng::SeededRng;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The relay as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayState {
    /// Bumped on every kill and every restart.
    pub generation: u64,
    /// Where to connect; `None` while the relay is down.
    pub target: Option<RelayTarget>,
}

/// How many kills, and how long the relay lives between them.
#[derive(Debug, Clone, Copy)]
pub struct KillPlan {
    /// Number of SIGKILLs.
    pub kills: u32,
    /// Shortest uptime before a kill.
    pub min_uptime: Duration,
    /// Longest uptime before a kill.
    pub max_uptime: Duration,
}

/// What a kill loop did.
#[derive(Debug, Clone, Copy, Default)]
pub struct KillStats {
    /// SIGKILLs delivered.
    pub kills: u32,
    /// Slowest restart (spawn to listening).
    pub slowest_restart: Duration,
    /// Total time spent restarting.
    pub total_restart: Duration,
    /// Restarts that could not rebind the previous port and took a new one.
    pub port_changes: u32,
}

/// A state channel for clients, starting with `relay` up.
pub fn relay_state_channel(
    relay: &RelayProcess,
) -> (watch::Sender<RelayState>, watch::Receiver<RelayState>) {
    watch::channel(RelayState {
        generation: 0,
        target: Some(relay.target()),
    })
}

/// Kill `relay` with SIGKILL `plan.kills` times, each after a random uptime
/// drawn from `rng`, restarting it on the same data directory (and port)
/// each time, and announcing every change on `state`.
pub async fn kill_restart_loop(
    relay: &mut RelayProcess,
    rng: &mut SeededRng,
    plan: KillPlan,
    state: &watch::Sender<RelayState>,
) -> Result<KillStats> {
    let mut stats = KillStats::default();
    let min = plan.min_uptime.as_millis() as u64;
    let max = plan.max_uptime.as_millis() as u64;
    for _ in 0..plan.kills {
        // The random moment of death is the point of the test, not a wait.
        tokio::time::sleep(Duration::from_millis(rng.range(min, max))).await;
        let previous = relay.quic_addr();
        relay.kill9()?;
        stats.kills += 1;
        state.send_modify(|s| {
            s.generation += 1;
            s.target = None;
        });
        let started = Instant::now();
        relay.restart().await?;
        let took = started.elapsed();
        stats.slowest_restart = stats.slowest_restart.max(took);
        stats.total_restart += took;
        if relay.quic_addr() != previous {
            stats.port_changes += 1;
        }
        let target = relay.target();
        state.send_modify(|s| {
            s.generation += 1;
            s.target = Some(target);
        });
    }
    Ok(stats)
}
