//! `hush-client`: the Hush client as a sans-IO sync engine.
//!
//! The same code runs in the browser (wasm32), natively (the `hush` CLI) and
//! in the deterministic simulator. It never opens sockets, reads clocks,
//! touches disks or draws OS randomness: a *driver* does that and feeds the
//! [`Engine`] inputs.
//!
//! # Driver contract
//!
//! ```text
//! records = storage.load_state()            // or Engine::create / Engine::join
//! engine  = Engine::load(records, seed_from_os_rng, EngineConfig::default())
//! loop:
//!     input = next of { transport connected/disconnected, frame received,
//!                       timer (Step::wake_at) fired, app command }
//!     step  = engine.handle(now_ms, input)?
//!     for f in step.early_frames { transport.send(f) } // 0. may precede 1
//!     storage.apply(&step.storage)          // 1. durable, atomically
//!     for f in step.frames { transport.send(f) }   // 2. then frames
//!     for e in step.events { app.show(e) }          // 3. then events / reply
//!     if step.close { transport.close() }
//!     sleep until step.wake_at; dial at step.connect_at while offline
//! ```
//!
//! The order is what makes Hush's promise hold: a received message is stored
//! before the relay is acknowledged (the ack is a frame of the same or a
//! later step) and before the app shows it (an event of the same step); an
//! outgoing message's outbox entry is stored before its first transmission.
//! If the process dies before 2, nothing of the step was acknowledged and
//! the relay delivers again; the engine, rebuilt from storage, drops the
//! repeat by sender seq. If `storage.apply` fails, the driver must not
//! perform the rest of the step: it drops the engine and rebuilds it from
//! storage, exactly as after a crash. An `Err` from [`Engine::handle`] means
//! the same.
//!
//! `early_frames` do not depend on their own step's storage (during a
//! backlog sync: the pulls of the next pages, acknowledging only what
//! earlier steps stored). A driver may send them as soon as every *earlier* step's storage
//! is durable — before this step's — and may handle further inputs while a
//! step commits, as long as each step's `frames` and `events` wait for its
//! own batch. That lets the relay serve page n+1 while page n is decrypted
//! and committed.
//!
//! # Module walk-through
//!
//! - [`engine`] — [`Engine`], [`Input`], [`Command`], [`Step`], [`Event`],
//!   [`Reply`], [`EngineConfig`]. Inside: `conn` (hello/auth/register,
//!   request bookkeeping, prekey and device-list publication and fetches —
//!   on every connect, on an unknown sender, with backoff for a contact with
//!   no device yet — reconnect backoff 1 s → 30 s with jitter), `send`
//!   (outbox, fan-out after a bounded refresh of stale device lists to
//!   every device of the contact and every other device of this user,
//!   sealing, relay confirmations, retries 1 s → 32 s with jitter, `Failed`
//!   after 5 minutes, re-sends and tail probes), `recv` (pages with merged
//!   acks, live pushes with windowed cumulative acks, decryption, dedup,
//!   ordering by sender seq, control items, batched receipts, gap repair)
//!   and `commands`.
//! - [`payload`] — what is inside the ciphertext: the logical message id and
//!   a [`payload::Body`] (text, recall, receipt, read/delete sync, resend
//!   request/unavailable, link hello/welcome, contact sync).
//! - [`storage`] — [`Storage`] (a transactional key-value batch interface),
//!   [`StorageOp`], the key layout ([`storage::keys`]), [`MemoryStorage`],
//!   native [`FileStorage`] (redb), and [`history`] for the app.
//! - [`state`] — the persisted records; public ones: [`MessageState`],
//!   [`HistoryRecord`], [`Tombstone`], [`Counters`].
//! - [`codes`] — [`ContactCode`] (`hush-contact:…`), [`LinkCode`]
//!   (`hush-link:…`), and the derived conversation ids.
//! - `sig` — the relay-checked signatures in `hush-protocol`'s byte formats.
//! - [`self_test`] — the AEAD known-answer check a driver passes before it
//!   starts a client ([`self_test::check_crypto`]).
//! - [`error`] — [`ClientError`], [`StorageError`].
//!
//! # Two sequence layers
//!
//! The relay seq (per inbox) drives the pull cursor and acknowledgements:
//! everything up to the cursor is durably handled here. The sender seq, per
//! (sender device, conversation, recipient device) and contiguous from 1, is
//! bound into the AEAD by the envelope header; each device therefore sees a
//! contiguous stream per (sender device, conversation) and detects loss end
//! to end, whatever the relay does. Control items (receipts, syncs, resend
//! requests, link messages) use a per-device-pair control conversation, so
//! they have their own seqs and never leave holes in chat streams.
//!
//! The full algorithm (sync, gap repair, receipts, tail probes, linking,
//! storage keys) is in `docs/CLIENT.md`.
//!
//! # Example
//!
//! ```
//! use hush_client::{Engine, EngineConfig, Input, MemoryStorage, Storage};
//! # fn main() -> Result<(), hush_client::ClientError> {
//! let mut storage = MemoryStorage::new();
//! let (mut engine, step) = Engine::create(1_700_000_000_000, [7; 32], "127.0.0.1:4433", "alice",
//!                                         EngineConfig::default())?;
//! storage.apply(&step.storage)?;
//! // The first step asks the driver to connect right away.
//! assert!(step.connect_at.is_some());
//! let step = engine.handle(1_700_000_000_000, Input::Connected)?;
//! storage.apply(&step.storage)?;
//! assert_eq!(step.frames.len(), 1); // Hello
//! // After a crash, the same state comes back from storage:
//! let again = Engine::load(storage.load_state()?, [8; 32], EngineConfig::default())?;
//! assert_eq!(again.device_id(), engine.device_id());
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod codes;
pub mod engine;
pub mod error;
pub mod payload;
pub mod self_test;
mod sig;
pub mod state;
pub mod storage;
#[cfg(target_arch = "wasm32")]
pub mod wasm;

pub use codes::{ContactCode, LinkCode, control_conversation, conversation_between};
pub use engine::{
    Command, ConnectionState, Engine, EngineConfig, Event, GroupCounters, GroupInfo, GroupPosition,
    Input, Reply, Step,
};
pub use error::{ClientError, StorageError};
pub use sig::verify_device_list;
pub use state::{Counters, HistoryRecord, MessageState, Removal, Tombstone};
pub use storage::memory::MemoryStorage;
pub use storage::seal::{KdfParams, StoreKey, Unlock};
pub use storage::{HistoryEntry, Storage, StorageOp, Syncing, history};

#[cfg(not(target_arch = "wasm32"))]
pub use storage::file::FileStorage;
