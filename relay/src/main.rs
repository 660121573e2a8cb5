//! `hush-relay`: run a Hush relay.
//!
//! Prints, once listening, `hush-relay listening on <addr>`, `http on <addr>`
//! (when enabled) and `certificate sha256: <hex>` on stdout — scripts parse
//! these to find ephemeral ports — and logs to stderr (`RUST_LOG`, default
//! `info`). Stops gracefully on SIGTERM or Ctrl-C and exits 0; exits 2 on a
//! bad configuration, and 3 after stopping because the store failed
//! (`--exit-on-store-failure`).

use clap::Parser;
use hush_relay::config::Cli;
use hush_relay::{Config, RelayError, RelayHandle, SystemClock};
use std::process::ExitCode;
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOC: hush_relay::Allocator = hush_relay::Allocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::from_cli(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hush-relay: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let runtime = match hush_relay::server::runtime(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hush-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hush-relay: {e}");
            match e {
                RelayError::StoreFailed(_) => ExitCode::from(STORE_FAILED_EXIT),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Exit status after stopping because the store failed (see
/// `--exit-on-store-failure`): a supervisor restarts the relay, and the
/// restart recovers every acknowledged envelope from the log.
const STORE_FAILED_EXIT: u8 = 3;

async fn run(config: Config) -> Result<(), RelayError> {
    let exit_on_store_failure = config.exit_on_store_failure;
    let relay = RelayHandle::start(config, Arc::new(SystemClock)).await?;
    // Watch SIGTERM before announcing the addresses: whoever reads them may
    // signal at once.
    let term = watch_term();
    relay.announce();
    let failed = if exit_on_store_failure {
        tokio::select! {
            () = wait_for_stop_signal(term) => None,
            why = relay.store_failed() => Some(why),
        }
    } else {
        wait_for_stop_signal(term).await;
        None
    };
    match failed {
        None => relay.shutdown().await,
        Some(why) => {
            tracing::error!("stopping: {why}");
            // The exit status says why the relay stopped, whatever else the
            // failed store makes the shutdown report.
            if let Err(e) = relay.shutdown().await {
                tracing::error!("shutting down after the store failed: {e}");
            }
            Err(RelayError::StoreFailed(why))
        }
    }
}

/// The SIGTERM watch (none off Unix).
#[cfg(unix)]
type TermWatch = std::io::Result<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type TermWatch = ();

/// Start watching SIGTERM now (from here on it no longer kills the process).
fn watch_term() -> TermWatch {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::terminate())
    }
}

/// SIGTERM (service managers) or Ctrl-C.
async fn wait_for_stop_signal(term: TermWatch) {
    #[cfg(unix)]
    {
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM ({e}); stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let () = term;
        let _ = tokio::signal::ctrl_c().await;
    }
}
