//! `hush-cli`: the `hush` command-line client on the native QUIC transport.
//!
//! The binary is a thin layer of commands over a reusable native driver, so
//! that benchmarks and tests run exactly the code the CLI runs:
//!
//! - [`transport`] — QUIC connection to the relay (ALPN `hush/1`, one
//!   bidirectional stream, length-prefixed frames), certificate pinning by
//!   SHA-256 or system trust roots.
//! - [`driver`] — [`driver::Driver`]: runs the sans-IO
//!   [`hush_client::Engine`] against the connection, a durable store and the
//!   clock, under the engine's contract (storage first, then frames, then
//!   events).
//! - [`home`] — the device's home directory (`client.redb`, `relay.json`).
//! - [`output`] — human and JSON-lines output; messages are printed from the
//!   stored history so none is missed between commands.
//! - [`commands`] — one function per subcommand.
//! - [`group`] — `hush group …` and how names become contacts or groups.
//! - [`error`] — [`CliError`] and exit codes.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod commands;
pub mod device;
pub mod driver;
pub mod error;
pub mod group;
pub mod home;
pub mod output;
pub mod transport;

pub use driver::{Driver, Outcome, View};
pub use error::CliError;
pub use transport::{CertCheck, RelayTarget, Transport};
