//! Bounded waiting. Tests never sleep on their own: they wait for a
//! condition with a bound, and a missed bound names what was awaited.

use crate::{HarnessError, Result};
use std::future::Future;
use std::time::Duration;
use tokio::time::{Instant, sleep};

/// Run `fut`, failing with [`HarnessError::Timeout`] naming `what` if it
/// takes longer than `bound`.
pub async fn within<T>(bound: Duration, what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(bound, fut)
        .await
        .map_err(|_| HarnessError::Timeout {
            what: what.to_string(),
            after: bound,
        })
}

/// First poll interval; doubled after every miss up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(2);
/// Longest pause between two polls.
const MAX_POLL: Duration = Duration::from_millis(100);

/// Poll `cond` until it returns true, for at most `bound`.
///
/// The only polling loop of the harness: the pause between polls starts at
/// 2 ms and doubles up to 100 ms, so fast conditions are seen quickly and slow
/// ones do not spin.
pub async fn wait_until(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    wait_until_async(bound, what, || std::future::ready(cond())).await
}

/// [`wait_until`] for conditions that need to await (a request to the relay,
/// an HTTP fetch).
pub async fn wait_until_async<F, Fut>(bound: Duration, what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    let mut pause = FIRST_POLL;
    loop {
        if cond().await {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(HarnessError::Timeout {
                what: what.to_string(),
                after: bound,
            });
        }
        sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// [`wait_until`] for plain threads (no runtime): the same bound and
/// back-off, blocking the calling thread between polls.
pub fn wait_until_blocking(
    bound: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = std::time::Instant::now() + bound;
    let mut pause = FIRST_POLL;
    loop {
        if cond() {
            return Ok(());
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return Err(HarnessError::Timeout {
                what: what.to_string(),
                after: bound,
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
}
