//! The browser driver and JavaScript bindings (wasm32 only).
//!
//! Built into the npm package `hush-client` (`cargo xtask build-wasm`):
//!
//! ```js
//! import init, { Client } from "hush-client";
//! await init();
//! const client = await Client.open({
//!   relayUrl: "https://127.0.0.1:4433/", certHash: "<hex sha256>",
//!   storage: "alice", name: "Alice",   // `name` creates the user on first open
//! });
//! client.on("message", (m) => console.log(m.contact, m.text));
//! await client.addContact("Bob", bobsContactCode);
//! const id = await client.send("Bob", "hi");
//! ```
//!
//! Modules:
//! - [`client`] — the `Client` class: options, commands, getters, listeners.
//! - `group` — the `Client`'s group methods (create, members, leave,
//!   rename, list, per-member states) and their TS types.
//! - `driver` — the single-threaded loop around the engine that performs
//!   every step in the driver-contract order (storage durable, then frames,
//!   then events), timers, reconnects, rebuild after a failure.
//! - `idb_store` — IndexedDB storage: one database per storage name, one
//!   readwrite transaction (strict durability) per commit.
//! - `pack` — a batch's history messages packed into one record per
//!   conversation (IndexedDB charges per record, not per byte).
//! - `history` — history pages and message look-ups read from IndexedDB.
//! - `transport` — WebTransport session and frame stream.
//! - `lock` — one open client per storage name across tabs (Web Locks).
//! - `convert` — events, entries, errors and options at the JS boundary.

pub mod client;
mod convert;
mod driver;
mod group;
mod history;
mod idb_store;
mod lock;
mod pack;
mod transport;

pub use client::Client;

use wasm_bindgen::prelude::wasm_bindgen;

#[wasm_bindgen(typescript_custom_section)]
const TS_TYPES: &'static str = r#"
/** Options of `Client.open`. */
export interface OpenOptions {
  /** Storage name: one IndexedDB database, one device. */
  storage: string;
  /** WebTransport URL of the relay, e.g. "https://127.0.0.1:4433/". Required to create a user; defaults to the stored relay. */
  relayUrl?: string;
  /** Hex SHA-256 of a self-signed relay certificate (what the relay serves at /certificate.sha256). */
  certHash?: string;
  /** WebSocket fallback URL ("ws://HOST:PORT/ws" or "wss://HOST:PORT/ws", from /relay.json): raced against WebTransport, which gets a 300 ms head start (none when the browser has no WebTransport). */
  websocketUrl?: string;
  /** Display name; creates a new user when the storage holds no device yet. */
  name?: string;
  /** Connect right away (default true); `false` waits for `setOnline(true)`. */
  online?: boolean;
}

/** Options of `Client.link`. */
export interface LinkOptions {
  /** Storage name for the new device (must be empty). */
  storage: string;
  /** The `hush-link:` code made by `linkCode()` on an existing device. */
  code: string;
  relayUrl?: string;
  certHash?: string;
  websocketUrl?: string;
  online?: boolean;
}

export interface SendOptions {
  /**
   * The relay's important retention class: kept unread up to the relay's
   * `--retention-important` (30 days by default) instead of its normal
   * retention.
   */
  important?: boolean;
}

export interface HistoryOptions {
  /** Page backwards from this position (an entry's `order`); omit for the newest. */
  before?: number;
  /** Messages per page: default 50, at most 500. */
  limit?: number;
}

export type MessageState = "sending" | "stored" | "delivered" | "read" | "failed" | "recipient-inbox-full";
export type ConnectionState = "offline" | "connecting" | "syncing" | "live";

/** Stable codes of the `HushError`s the client rejects with. */
export type HushErrorCode =
  | "invalid_argument" | "unknown" | "not_allowed" | "bad_code" | "too_large"
  | "storage" | "crypto" | "protocol" | "no_device" | "locked" | "closed"
  | "busy" | "unsupported" | "internal" | "self_test" | "archive";

/** Every rejection is an `Error` with `name === "HushError"` and a `code`. */
export interface HushError extends Error {
  name: "HushError";
  code: HushErrorCode;
}

/** A stored message (ids are lowercase hex; times are ms since the epoch). */
export interface MessageRecord {
  id: string;
  conversation: string;
  /** Display name of the contact the conversation is with (null in a group). */
  contact: string | null;
  /** The group's name when the conversation is a group, else null. */
  group: string | null;
  /** Display name of the author: "me", a contact's name, or null for a group member who is no contact. */
  from: string | null;
  fromUser: string;
  fromDevice: string;
  senderSeq: number;
  sentAt: number;
  storedAt: number;
  text: string;
  /** Written by this user (on this or another of their devices). */
  outgoing: boolean;
}

export interface HistoryEntry extends MessageRecord {
  /** Position in this device's history; pass as `before` to page back. */
  order: number;
  read: boolean;
  /** Delivery state of a message this user sent. */
  state: MessageState | null;
}

export interface MessageEvent extends MessageRecord { type: "message" }
/**
 * Once per engine step that stored messages, after their `message` events:
 * how many per conversation. The cheap way to follow a large backlog — a
 * `message` object is only built while something listens to `message` or
 * `"*"`; read what is shown with `history()`.
 */
export interface MessagesEvent {
  type: "messages";
  count: number;
  conversations: { conversation: string; contact: string | null; group: string | null; count: number; incoming: number }[];
}
export interface StateEvent { type: "state"; id: string; conversation: string; state: MessageState }
export interface RemovedEvent { type: "removed"; id: string; conversation: string; reason: "recalled" | "deleted" }
export interface ReadEvent { type: "read"; conversation: string; ids: string[] }
export interface ProgressEvent { type: "progress"; done: number; total: number }
export interface GapEvent {
  type: "gap";
  kind: "detected" | "recovered" | "unrecoverable";
  conversation: string;
  contact: string | null;
  fromDevice: string;
  count: number;
}
/** The relay reported seqs expired that their sender says it never wrote. */
export interface RelayMisbehaviourEvent {
  type: "relayMisbehaviour";
  conversation: string;
  contact: string | null;
  fromDevice: string;
  count: number;
}
export interface RotationEvent { type: "rotation"; device: string; epoch: number }
export interface ConnectionEvent { type: "connection"; state: ConnectionState }
export interface ContactEvent { type: "contact"; user: string; name: string; conversation: string }
export interface DevicesEvent { type: "devices"; user: string; contact: string | null; devices: string[] }
/** `self: true` on a new device once welcomed; `false` (with `device`) on the device that issued the code. */
export interface LinkedEvent { type: "linked"; self: boolean; device?: string }
export interface WarningEvent { type: "warning"; message: string }
/** History import on a newly linked device: messages imported of those in the archive. */
export interface HistoryEvent { type: "history"; done: number; total: number }
/** Another device asked for this device's history; the client exports and uploads it. */
export interface HistoryExportEvent { type: "history_export"; device: string }
/** The history archive for a new device was uploaded and offered to it. */
export interface HistoryExportedEvent { type: "history_exported"; device: string; messages: number }
/** This device was removed by its user: the relay refuses it from now on. */
export interface DeviceRemovedEvent { type: "device_removed" }
/** The relay had not seen this device for its stale period: messages sent meanwhile did not reach it. */
export interface RetiredEvent { type: "retired"; lastSeenMs: number }
/** A failure; `fatal: false` means the client rebuilt itself from storage and carries on. */
export interface ErrorEvent { type: "error"; code: HushErrorCode; message: string; fatal: boolean }

export type HushEvent =
  | MessageEvent | MessagesEvent | StateEvent | RemovedEvent | ReadEvent | ProgressEvent | GapEvent
  | RotationEvent | ConnectionEvent | ContactEvent | DevicesEvent | LinkedEvent
  | WarningEvent | ErrorEvent | RelayMisbehaviourEvent | GroupEvent
  | HistoryEvent | HistoryExportEvent | HistoryExportedEvent | DeviceRemovedEvent | RetiredEvent;

export interface HushEventMap {
  message: MessageEvent;
  messages: MessagesEvent;
  state: StateEvent;
  removed: RemovedEvent;
  read: ReadEvent;
  progress: ProgressEvent;
  gap: GapEvent;
  relayMisbehaviour: RelayMisbehaviourEvent;
  rotation: RotationEvent;
  connection: ConnectionEvent;
  contact: ContactEvent;
  devices: DevicesEvent;
  linked: LinkedEvent;
  warning: WarningEvent;
  error: ErrorEvent;
  group: GroupEvent;
  history: HistoryEvent;
  history_export: HistoryExportEvent;
  history_exported: HistoryExportedEvent;
  device_removed: DeviceRemovedEvent;
  retired: RetiredEvent;
  "*": HushEvent;
}
export type HushEventType = keyof HushEventMap;

/** One device of this user: `stale` and `lastSeenMs` are the relay's word (unsigned). */
export interface DeviceInfo { device: string; self: boolean; lastSeenMs: number | null; stale: boolean }
export interface Conversation { conversation: string; name: string; user: string; devices: number }

export interface Status {
  storage: string;
  state: ConnectionState;
  /** What `setOnline` last asked for. */
  online: boolean;
  device: string;
  user: string;
  name: string;
  /** Relay address as contact codes carry it (host:port). */
  relay: string;
  relayUrl: string;
  /** The transport of the open connection, or null when there is none. */
  transport: "webtransport" | "websocket" | null;
  /** Messages not yet stored by the relay. */
  unsent: number;
  /** "passed": the AEAD known-answer self-test ran when this page opened a client (a failing one refuses with code `self_test`). */
  selfTest: "passed" | "not run";
}

export interface Counters {
  duplicatesDropped: number;
  outOfOrder: number;
  gapsDetected: number;
  recovered: number;
  unrecoverable: number;
  rejected: number;
  resent: number;
  probes: number;
  suppressed: number;
  /** Seqs a relay reported expired beyond what their sender authenticated (asked of the sender, never skipped). */
  relayClaimsIgnored: number;
  /** Of those, seqs the sender said it never wrote: proven relay misbehaviour. */
  relayClaimsRefuted: number;
  /** Peer requests or answers about seqs the peer or this device never wrote. */
  peerClaimsIgnored: number;
  /** Envelopes from unknown devices dropped beyond the parking bounds. */
  parkedDropped: number;
  /** Recalls refused because the recaller did not write the message. */
  recallsRefused: number;
  /** Envelopes dropped unopened because their sender's work budget was spent. */
  undecryptableSkipped: number;
}

export interface Client {
  /** Listen to events of one type (`"*"` for all); returns a function that removes the listener. */
  on<K extends HushEventType>(eventType: K, listener: (event: HushEventMap[K]) => void): () => void;
  /** Stop listening (the same type and function given to `on`). */
  off<K extends HushEventType>(eventType: K, listener: (event: HushEventMap[K]) => void): void;
  addEventListener<K extends HushEventType>(eventType: K, listener: (event: HushEventMap[K]) => void): void;
  removeEventListener<K extends HushEventType>(eventType: K, listener: (event: HushEventMap[K]) => void): void;
}
"#;
