//! `hush-protocol`: the bytes that travel between Hush devices and the relay.
//!
//! Both the relay and every client depend on this crate and on nothing else to
//! agree on the wire, so it holds no IO and no cryptography. It is organised as:
//!
//! - [`limits`] — every size limit as a named constant. Decoders check them
//!   before trusting a length, so arbitrary input can never make either side
//!   allocate more than a frame's worth of memory.
//! - [`ids`] — fixed-size identifiers: devices, users, conversations and the
//!   time-ordered 128-bit [`MessageId`] that senders mint themselves.
//! - [`envelope`] — the end-to-end encrypted [`Envelope`]: a plaintext
//!   [`EnvelopeHeader`] with a hand-written fixed layout (its exact bytes are the
//!   AEAD associated data, so they must never depend on a serializer's whims)
//!   followed by opaque ciphertext.
//! - [`frame`] — requests ([`ClientFrame`]) and replies/pushes ([`ServerFrame`]),
//!   encoded with postcard inside a length-prefixed, versioned frame, and the
//!   incremental [`FrameBuffer`] that splits a byte stream into frames.
//! - [`raw`] — the same page and push frames written straight from stored
//!   envelope bytes ([`RawDelivered`]), so the relay never decodes an
//!   envelope only to encode it again.
//! - [`error`] — [`ProtocolError`] for local decode failures and [`ErrorCode`]
//!   for the typed refusals the relay sends back.
//!
//! The byte-level specification lives in `docs/PROTOCOL.md`; the tests in this
//! crate check the code against it.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod envelope;
pub mod error;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod raw;

pub use envelope::{Envelope, EnvelopeHeader, SessionInitHeader};
pub use error::{ErrorCode, ProtocolError, WireError};
pub use frame::{
    AuthOk, ClientFrame, Delivered, DeviceEntry, DeviceLease, DeviceList, DeviceRegistration,
    DroppedRange, FrameBuffer, OneTimePrekey, Page, PrekeyBundle, Request, Response, SendOutcome,
    ServerFrame, SignedDeviceList, SignedPrekey, Truncation, auth_challenge_bytes,
    decode_client_frame, decode_server_frame, encode_client_frame, encode_server_frame,
};
pub use ids::{BlobId, ConversationId, DeviceId, MessageId, UserKey};
pub use raw::{RawDelivered, encode_early_push_frame, encode_page_frame, encode_push_frame};

/// The protocol version carried in every frame and envelope header.
pub const PROTOCOL_VERSION: u8 = 1;

/// ALPN identifier of the raw-QUIC protocol spoken by native clients.
pub const ALPN_HUSH: &[u8] = b"hush/1";

/// ALPN identifier under which browsers reach the relay over WebTransport.
pub const ALPN_H3: &[u8] = b"h3";
