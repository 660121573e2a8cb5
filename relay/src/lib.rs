//! `hush-relay`: a durable QUIC store-and-forward server for end-to-end
//! encrypted envelopes. It routes by the plaintext envelope header and
//! cannot read anything else.
//!
//! Layout:
//! - [`store`] — durable storage behind the [`store::Store`] trait (redb).
//! - [`core`] — the protocol logic as a sans-IO state machine
//!   ([`core::RelayCore`], [`core::Session`]); the simulator drives it directly.
//! - [`server`] — the running relay: QUIC endpoint with ALPN dispatch
//!   (native `hush/1` and WebTransport for browsers on the same port), the
//!   connection driver, group commit, retention, certificate renewal
//!   ([`RelayHandle`]).
//! - [`tls`] — certificates (operator PEM files or a renewable dev cert).
//! - [`http`] — health, metrics, certificate hash and `/relay.json` over
//!   HTTP/1.1; with `--demo`, the browser demo embedded by [`demo`].
//! - [`cluster`] — several relay nodes over one store: the cluster bus
//!   (live push and presence across nodes), shards, shared rate limits.
//! - [`config`] — flags, `HUSH_*` environment and TOML file.
//! - [`metrics`], [`clock`], [`error`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod clock;
pub mod cluster;
pub mod config;
pub mod core;
pub mod demo;
pub mod error;
pub mod http;
pub mod metrics;
pub mod server;
pub mod store;
pub mod tls;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Config;
pub use error::RelayError;
pub use metrics::Metrics;
pub use server::{RelayHandle, StartOptions};

/// The global allocator of the `hush-relay` binary and of the benchmarks
/// that measure it in-process (mimalloc).
///
/// The commit writer and the QUIC tasks allocate and free many small
/// buffers per envelope (redb pages, frames, packets); with glibc's malloc
/// a profile of the latency benchmark spent about an eighth of the writer's
/// CPU in `malloc`/`free` and their consolidation. A binary opts in with
/// `#[global_allocator] static ALLOC: hush_relay::Allocator = hush_relay::Allocator;`.
///
/// It is built without transparent huge pages (`no_thp`): mimalloc would
/// otherwise ask the kernel for 2 MiB pages on its regions, and every
/// region it returns after a burst and touches again is a fresh huge page
/// the kernel zeroes whole. A profile of the client's catch-up had a sixth
/// of all its samples in that zeroing; without it the catch-up took a third
/// less time and the relay's durable ingest doubled on the 2-core benchmark
/// host (BENCHMARKS.md).
/// On a host whose THP mode is `always` (not `madvise`), set
/// `MIMALLOC_ALLOW_THP=0` in the relay's environment as well (OPERATING.md).
pub use mimalloc::MiMalloc as Allocator;
