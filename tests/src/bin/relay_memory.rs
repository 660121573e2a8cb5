//! `relay_memory`: the Hush relay with its store replaced by the in-memory
//! one (`MemoryStore`), for measuring what the durable store costs.
//!
//! Everything else is the relay binary's: the same flags, connection
//! threads, transport, protocol handling, group-commit writer and
//! allocator. Only the store differs: nothing is written to disk, nothing
//! is synced and everything is lost on exit, so **it is never a relay to
//! run for real**. `peer_load --memory-store` runs job A against it as a
//! labelled extra row of `cargo xtask bench --peers`: the distance between
//! that row and Hush's own is the price of the durable store; the row
//! itself is a ceiling for any store on the same host (BENCHMARKS.md,
//! "The one target not met, and why").
//!
//! Prints the same lines as `hush-relay` once listening (so the test
//! harness can start it in its place) and stops on SIGTERM or Ctrl-C.

use clap::Parser;
use hush_relay::config::Cli;
use hush_relay::store::memory::MemoryStore;
use hush_relay::{Config, RelayHandle, StartOptions, SystemClock};
use std::process::ExitCode;
use std::sync::Arc;

#[global_allocator]
static ALLOC: hush_relay::Allocator = hush_relay::Allocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_cli(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay_memory: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match hush_relay::server::runtime(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relay_memory: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay_memory: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("relay_memory: in-memory store, nothing is durable (for benchmarks only)");
    let store = Arc::new(MemoryStore::new(config.store_limits()));
    let relay = RelayHandle::start_with_store(
        config,
        Arc::new(SystemClock),
        store,
        StartOptions::default(),
    )
    .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    relay.announce();
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    relay.shutdown().await?;
    Ok(())
}
