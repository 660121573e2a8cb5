//! Pages and pushes built from envelopes kept in their wire form.
//!
//! The relay stores every envelope as the bytes its sender encoded
//! ([`Envelope::to_bytes`]) and sends exactly those bytes on. Decoding them
//! into an [`Envelope`] only to encode the frame again costs, per envelope,
//! an allocation and a copy to decode and two of each to encode (postcard
//! measures the frame, then writes it); for a page of 200 × 1 KiB that was a
//! good part of the relay's own work in a catch-up. [`RawDelivered`] keeps
//! the stored bytes, checked once with [`Envelope::check_bytes`], and
//! [`encode_page_frame`] / [`encode_push_frame`] write the frame
//! [`encode_server_frame`] would write for the decoded envelopes, byte for
//! byte (tested against it in `tests/raw_frames.rs`).
//!
//! How: postcard writes `Delivered` as `varint(seq) ‖ varint(len) ‖ bytes`
//! and a `Vec` as `varint(count) ‖ items`. The frame with no envelopes is
//! encoded by [`encode_server_frame`] as usual; its envelope count is the
//! single `0x00` byte right before the fields that follow the list
//! (`remaining` and `truncated` for a page, nothing for a push), and the
//! envelopes are spliced in there. So this module depends on postcard's
//! varint and sequence layout (postcard wire format 1.0, which the protocol
//! is specified on), not on the variant numbering of the frame types.

use bytes::Bytes;

use crate::envelope::Envelope;
use crate::error::ProtocolError;
use crate::frame::{Delivered, Page, Response, ServerFrame, Truncation, encode_server_frame};
use crate::limits::{MAX_FRAME_LEN, MAX_PAGE};

/// An envelope with its relay seq, kept as the bytes it was stored as.
///
/// Only [`RawDelivered::new`] makes one, after [`Envelope::check_bytes`]:
/// so every frame built from these decodes on the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDelivered {
    seq: u64,
    /// Shared with the buffer it was read into (a slice of a segment read
    /// in the relay), so keeping it costs no copy.
    bytes: Bytes,
}

impl RawDelivered {
    /// Check that `bytes` decode as an envelope and keep them as they are.
    pub fn new(seq: u64, bytes: impl Into<Bytes>) -> Result<RawDelivered, ProtocolError> {
        let bytes = bytes.into();
        Envelope::check_bytes(&bytes)?;
        Ok(RawDelivered { seq, bytes })
    }

    /// The relay seq.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The envelope's wire bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The decoded form (for tests and in-process consumers).
    pub fn decode(&self) -> Result<Delivered, ProtocolError> {
        Ok(Delivered {
            seq: self.seq,
            envelope: Envelope::from_bytes(&self.bytes)?,
        })
    }
}

/// The frame `ServerFrame::Response { request_id, response:
/// Response::Page(Page { envelopes, remaining, truncated }) }` with
/// `envelopes` decoded from `raw`, encoded as [`encode_server_frame`] does.
pub fn encode_page_frame(
    request_id: u32,
    raw: &[RawDelivered],
    remaining: u64,
    truncated: Option<&Truncation>,
) -> Result<Vec<u8>, ProtocolError> {
    let empty = ServerFrame::Response {
        request_id,
        response: Response::Page(Page {
            envelopes: Vec::new(),
            remaining,
            truncated: truncated.cloned(),
        }),
    };
    let after = postcard::to_extend(&(remaining, truncated), Vec::new())
        .map_err(|_| ProtocolError::Malformed("unencodable value"))?;
    splice(&empty, raw, after.len())
}

/// The frame `ServerFrame::Push { envelopes }` with `envelopes` decoded
/// from `raw`, encoded as [`encode_server_frame`] does.
pub fn encode_push_frame(raw: &[RawDelivered]) -> Result<Vec<u8>, ProtocolError> {
    splice(
        &ServerFrame::Push {
            envelopes: Vec::new(),
        },
        raw,
        0,
    )
}

/// The frame `ServerFrame::EarlyPush { envelopes }` with `envelopes`
/// decoded from `raw`, encoded as [`encode_server_frame`] does.
pub fn encode_early_push_frame(raw: &[RawDelivered]) -> Result<Vec<u8>, ProtocolError> {
    splice(
        &ServerFrame::EarlyPush {
            envelopes: Vec::new(),
        },
        raw,
        0,
    )
}

/// Encode `empty` (a frame whose envelope list is empty and is followed by
/// `after_len` bytes of other fields) with `raw` in that list.
fn splice(
    empty: &ServerFrame,
    raw: &[RawDelivered],
    after_len: usize,
) -> Result<Vec<u8>, ProtocolError> {
    if raw.len() > usize::from(MAX_PAGE) {
        return Err(ProtocolError::TooLarge {
            what: "page",
            len: raw.len(),
            max: usize::from(MAX_PAGE),
        });
    }
    let frame = encode_server_frame(empty)?;
    let count_at = frame
        .len()
        .checked_sub(after_len + 1)
        .filter(|&at| at > 4 && frame.get(at) == Some(&0))
        .ok_or(ProtocolError::Malformed("unexpected frame layout"))?;
    let items: usize = raw
        .iter()
        .map(|d| varint_len(d.seq) + varint_len(d.bytes.len() as u64) + d.bytes.len())
        .sum();
    let mut out = Vec::with_capacity(frame.len() + varint_len(raw.len() as u64) + items);
    out.extend_from_slice(frame.get(..count_at).unwrap_or_default());
    push_varint(&mut out, raw.len() as u64);
    for d in raw {
        push_varint(&mut out, d.seq);
        push_varint(&mut out, d.bytes.len() as u64);
        out.extend_from_slice(&d.bytes);
    }
    out.extend_from_slice(frame.get(count_at + 1..).unwrap_or_default());
    let body_len = out.len() - 4;
    let len = u32::try_from(body_len)
        .ok()
        .filter(|_| body_len <= MAX_FRAME_LEN)
        .ok_or(ProtocolError::TooLarge {
            what: "frame",
            len: body_len,
            max: MAX_FRAME_LEN,
        })?;
    if let Some(prefix) = out.get_mut(..4) {
        prefix.copy_from_slice(&len.to_be_bytes());
    }
    Ok(out)
}

/// Postcard's unsigned varint (LEB128): seven bits a byte, low first.
fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes [`push_varint`] writes for `v`.
fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_their_length() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            push_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            let mut back = 0u64;
            for (i, b) in out.iter().enumerate() {
                back |= u64::from(b & 0x7f) << (7 * i);
            }
            assert_eq!(back, v);
        }
    }
}
