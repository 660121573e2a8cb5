//! History transfer to a newly linked device (docs/CLIENT.md, "History
//! transfer").
//!
//! The new device sends [`Body::HistoryRequest`] with its `LinkHello`. The
//! device that made the link code asks its driver for the history
//! ([`Event::HistoryExportWanted`]; the engine never reads history itself),
//! seals it into an archive under a fresh one-time key and uploads it as a
//! relay blob in pieces ([`Request::BlobPut`], resumed from
//! [`Request::BlobStatus`] after a reconnect). Once the relay holds all of
//! it, the old device sends [`Body::HistoryOffer`] (blob id and key, end to
//! end encrypted) and forgets the key. The new device downloads the blob
//! ([`Request::BlobGet`]), opens and imports it chunk by chunk, and records
//! after each chunk where to continue, so a cut connection or a restart
//! resumes the download at the first chunk not yet imported.
//!
//! Archive: chunk `i` is the postcard encoding of up to
//! [`MESSAGES_PER_CHUNK`] [`ArchivedMessage`]s, sealed with
//! ChaCha20-Poly1305 in the STREAM construction
//! ([`hush_crypto::seal_stream_chunk`]: nonce = chunk index ‖ last-chunk
//! flag, associated data = [`ARCHIVE_AD`] ‖ blob id). The blob is the
//! sequence of `u32` big-endian length ‖ sealed chunk. A chunk opens only at
//! its own position and only the last one as last, so a reordered, cut,
//! spliced or tampered archive, or one under another key, is refused.
//!
//! Imported messages get history positions below every position this device
//! assigns itself (a linked device starts counting at [`IMPORT_ORDER_BASE`]),
//! so the imported history comes first, in the old device's order, and
//! messages received meanwhile follow it. A message received both ways is
//! stored once (by id).

use super::{Dirty, Engine, Event, Pending};
use crate::error::ClientError;
use crate::payload::Body;
use crate::state::{HistoryRecord, MessageState, SecretKey};
use crate::storage::{self, HistoryEntry, Storage, StorageOp, keys};
use hush_protocol::limits::MAX_BLOB_CHUNK;
use hush_protocol::{BlobId, ConversationId, DeviceId, MessageId, Request, Response, WireError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use zeroize::Zeroizing;

/// Associated data of every archive chunk (with the blob id appended).
pub const ARCHIVE_AD: &[u8] = b"hush-history-archive-v1";
/// Messages per archive chunk.
pub const MESSAGES_PER_CHUNK: usize = 256;
/// Bytes per `BlobPut` / `BlobGet`.
pub const PIECE_BYTES: usize = 256 * 1024;
/// First history position a linked device assigns to messages it receives;
/// positions below are for imported history.
pub const IMPORT_ORDER_BASE: u64 = 1 << 40;
/// Storage key of the transfer state.
pub(crate) const XFER: &[u8] = b"s/xfer";
/// Imported messages written at most this long before the device joined
/// are remembered by id, so a live copy of one is dropped.
const OVERLAP_MS: u64 = 3_600_000;

/// One message in an archive: the record with its read mark and delivery
/// state, as the old device shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedMessage {
    /// The message.
    pub record: HistoryRecord,
    /// Marked read.
    pub read: bool,
    /// For messages this user sent: the delivery state.
    pub state: Option<MessageState>,
}

impl From<HistoryEntry> for ArchivedMessage {
    fn from(e: HistoryEntry) -> Self {
        ArchivedMessage {
            record: e.record,
            read: e.read,
            state: e.state,
        }
    }
}

/// Every message of `conversations` in `storage`, each conversation in its
/// history order: what a device exports for a newly linked one.
pub fn export_history<S: Storage + ?Sized>(
    storage: &S,
    conversations: &[ConversationId],
) -> Result<Vec<ArchivedMessage>, ClientError> {
    let mut out = Vec::new();
    for c in conversations {
        let entries = storage::history(storage, c, None, usize::MAX)?;
        out.extend(entries.into_iter().map(ArchivedMessage::from));
    }
    Ok(out)
}

fn ad(blob: &BlobId) -> Vec<u8> {
    let mut ad = ARCHIVE_AD.to_vec();
    ad.extend_from_slice(blob.as_bytes());
    ad
}

/// Seal `messages` into an archive for `blob` under `key`; returns the blob
/// bytes and the chunk count (at least one chunk, even for no messages).
pub fn seal_archive(
    key: &[u8; 32],
    blob: &BlobId,
    messages: &[ArchivedMessage],
) -> Result<(Vec<u8>, u32), ClientError> {
    let ad = ad(blob);
    let groups: Vec<&[ArchivedMessage]> = if messages.is_empty() {
        vec![&[]]
    } else {
        messages.chunks(MESSAGES_PER_CHUNK).collect()
    };
    let n = groups.len();
    let mut out = Vec::new();
    for (i, group) in groups.into_iter().enumerate() {
        let plain = Zeroizing::new(
            postcard::to_allocvec(group).map_err(|_| ClientError::Archive("unencodable"))?,
        );
        let sealed = hush_crypto::seal_stream_chunk(key, i as u64, i + 1 == n, &plain, &ad)?;
        let len = u32::try_from(sealed.len()).map_err(|_| ClientError::Archive("chunk size"))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&sealed);
    }
    let chunks = u32::try_from(n).map_err(|_| ClientError::Archive("chunk count"))?;
    Ok((out, chunks))
}

/// Take the next complete sealed chunk off the front of `buf` and open it
/// as chunk `index` of `chunks`. `Ok(None)` if `buf` does not hold a whole
/// chunk yet.
pub fn open_next_chunk(
    key: &[u8; 32],
    blob: &BlobId,
    index: u32,
    chunks: u32,
    buf: &mut Vec<u8>,
) -> Result<Option<Vec<ArchivedMessage>>, ClientError> {
    if index >= chunks {
        return Err(ClientError::Archive("bytes after the last chunk"));
    }
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let mut len = [0u8; 4];
    len.copy_from_slice(prefix);
    let len = u32::from_be_bytes(len) as usize;
    // A sealed chunk is at most a chunk of messages plus the tag; anything
    // larger cannot be one (and must not make us wait for ever).
    if len > 64 * 1024 * 1024 {
        return Err(ClientError::Archive("chunk length out of range"));
    }
    let Some(sealed) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let plain = Zeroizing::new(
        hush_crypto::open_stream_chunk(
            key,
            u64::from(index),
            index + 1 == chunks,
            sealed,
            &ad(blob),
        )
        .map_err(|_| {
            ClientError::Archive("a chunk does not open (tampered, reordered, or another key)")
        })?,
    );
    let messages: Vec<ArchivedMessage> =
        postcard::from_bytes(&plain).map_err(|_| ClientError::Archive("malformed chunk"))?;
    buf.drain(..4 + len);
    Ok(Some(messages))
}

/// Open a whole archive (tests and tools).
pub fn open_archive(
    key: &[u8; 32],
    blob: &BlobId,
    chunks: u32,
    bytes: &[u8],
) -> Result<Vec<ArchivedMessage>, ClientError> {
    let mut buf = bytes.to_vec();
    let mut out = Vec::new();
    for i in 0..chunks {
        match open_next_chunk(key, blob, i, chunks, &mut buf)? {
            Some(m) => out.extend(m),
            None => return Err(ClientError::Archive("truncated")),
        }
    }
    if !buf.is_empty() {
        return Err(ClientError::Archive("bytes after the last chunk"));
    }
    Ok(out)
}

/// An archive being downloaded (persisted: resumes after a restart).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Incoming {
    blob: BlobId,
    key: SecretKey,
    total_len: u64,
    chunks: u32,
    messages: u64,
    /// Blob offset of the first chunk not yet imported.
    offset: u64,
    /// Index of that chunk.
    next_chunk: u32,
    /// Messages imported so far.
    imported: u64,
}

/// `s/xfer`: the transfer state of this device.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct XferState {
    /// New device: ask the inviter for the history.
    want: bool,
    /// New device: the request was queued (to this inviter).
    requested: Option<DeviceId>,
    /// New device: when it joined (relay-independent, this device's clock).
    joined_ms: u64,
    /// Old device: devices that linked with a code of ours and may ask once.
    may_ask: BTreeSet<DeviceId>,
    /// Old device: devices owed an archive.
    owed: BTreeSet<DeviceId>,
    /// New device: the archive being imported.
    incoming: Option<Incoming>,
    /// New device: the next history position for an imported message.
    next_import_order: u64,
    /// New device: recent imported ids (a live copy of one is dropped).
    imported_recent: BTreeSet<MessageId>,
    /// New device: ids received live while the import was pending.
    live_ids: BTreeSet<MessageId>,
    /// New device: the import finished (or failed, or was declined).
    done: bool,
}

/// An archive being uploaded (in memory: after a restart the driver
/// exports again and a new blob is uploaded).
struct Upload {
    to: DeviceId,
    blob: BlobId,
    key: Zeroizing<[u8; 32]>,
    bytes: Vec<u8>,
    chunks: u32,
    messages: u64,
    committed: u64,
    /// `BlobStatus` answered on this connection (resume point known).
    synced: bool,
}

/// The engine's transfer state: persisted part and connection-bound part.
#[derive(Default)]
pub(crate) struct Transfer {
    pub(crate) state: XferState,
    upload: Option<Upload>,
    /// Downloaded bytes of the incoming archive not yet imported.
    buf: Vec<u8>,
    /// A blob request is in flight on this connection.
    in_flight: bool,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("uploading", &self.upload.is_some())
            .field("importing", &self.state.incoming.is_some())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Set a joining device up to ask for the history (or not).
    pub(crate) fn history_init_join(&mut self, now: u64, want: bool) {
        self.history.state.want = want;
        self.history.state.joined_ms = now;
        self.counters.next_order = IMPORT_ORDER_BASE;
        self.touch(Dirty::Counters);
        self.touch(Dirty::Xfer);
    }

    pub(crate) fn history_load(&mut self, k: &[u8], v: &[u8]) -> Result<(), ClientError> {
        self.history.state = storage::decode(k, v)?;
        Ok(())
    }

    pub(crate) fn history_record(&self) -> Result<StorageOp, ClientError> {
        Ok(StorageOp::Put {
            key: XFER.to_vec(),
            value: storage::encode(&self.history.state)?,
        })
    }

    /// Queue the history request with the link hello.
    pub(crate) fn history_after_link_hello(
        &mut self,
        now: u64,
        inviter: DeviceId,
    ) -> Result<(), ClientError> {
        if self.history.state.want && self.history.state.requested.is_none() {
            self.queue_control(now, inviter, Body::HistoryRequest)?;
            self.history.state.requested = Some(inviter);
            self.touch(Dirty::Xfer);
        }
        Ok(())
    }

    /// A device linked with one of our codes: it may ask for the history.
    pub(crate) fn history_note_linked(&mut self, device: DeviceId) {
        self.history.state.may_ask.insert(device);
        self.touch(Dirty::Xfer);
    }

    pub(crate) fn on_history_request(&mut self, device: DeviceId) {
        if self.history.state.may_ask.remove(&device) {
            self.history.state.owed.insert(device);
            self.touch(Dirty::Xfer);
            self.event(Event::HistoryExportWanted { device });
        } else {
            self.reject();
        }
    }

    /// The device owed an archive whose export the driver should run now
    /// ([`Engine::start_history_export`]), if any and none is uploading.
    pub fn history_export_wanted(&self) -> Option<DeviceId> {
        if self.history.upload.is_some() {
            return None;
        }
        self.history.state.owed.first().copied()
    }

    /// Seal `messages` (from [`export_history`]) for `device` and start
    /// uploading them.
    pub fn start_history_export(
        &mut self,
        now: u64,
        device: DeviceId,
        messages: Vec<ArchivedMessage>,
    ) -> Result<super::Step, ClientError> {
        if !self.history.state.owed.contains(&device) {
            return Err(ClientError::NotAllowed("no history is owed to this device"));
        }
        let key = Zeroizing::new(super::random_array::<32>(&mut self.rng));
        let blob = BlobId(super::random_array(&mut self.rng));
        let (bytes, chunks) = seal_archive(&key, &blob, &messages)?;
        self.history.upload = Some(Upload {
            to: device,
            blob,
            key,
            bytes,
            chunks,
            messages: messages.len() as u64,
            committed: 0,
            // A new blob: nothing to ask about.
            synced: true,
        });
        self.history.in_flight = false;
        self.pump_history(now)?;
        self.finish(now)
    }

    pub(crate) fn history_on_disconnected(&mut self) {
        self.history.in_flight = false;
        self.history.buf.clear();
        if let Some(u) = self.history.upload.as_mut() {
            u.synced = false;
        }
    }

    /// Send the next blob request, if a transfer is running and none is in flight.
    pub(crate) fn pump_history(&mut self, now: u64) -> Result<(), ClientError> {
        let _ = now;
        if !self.link.ready || self.history.in_flight {
            return Ok(());
        }
        if let Some(u) = &self.history.upload {
            let blob = u.blob;
            let request = if !u.synced {
                (Request::BlobStatus { blob }, Pending::BlobStatus)
            } else {
                let start = usize::try_from(u.committed).unwrap_or(usize::MAX);
                let piece = self.cfg.history_piece_bytes.clamp(1, MAX_BLOB_CHUNK as u32);
                let end = start.saturating_add(piece as usize).min(u.bytes.len());
                let piece = u.bytes.get(start..end).unwrap_or_default().to_vec();
                (
                    Request::BlobPut {
                        blob,
                        offset: u.committed,
                        total_len: u.bytes.len() as u64,
                        bytes: piece,
                    },
                    Pending::BlobPut,
                )
            };
            self.history.in_flight = true;
            self.request(request.0, request.1);
            return Ok(());
        }
        if let Some(inc) = &self.history.state.incoming {
            let offset = inc.offset + self.history.buf.len() as u64;
            let blob = inc.blob;
            self.history.in_flight = true;
            self.request(
                Request::BlobGet {
                    blob,
                    offset,
                    max: self.cfg.history_piece_bytes.clamp(1, MAX_BLOB_CHUNK as u32),
                },
                Pending::BlobGet,
            );
        }
        Ok(())
    }

    pub(crate) fn on_blob_response(
        &mut self,
        now: u64,
        p: Pending,
        r: Response,
    ) -> Result<(), ClientError> {
        self.history.in_flight = false;
        match (p, r) {
            (Pending::BlobStatus, Response::BlobState { committed, .. })
            | (Pending::BlobPut, Response::BlobStored { committed, .. }) => {
                let done = match self.history.upload.as_mut() {
                    Some(u) => {
                        u.committed = committed.min(u.bytes.len() as u64);
                        u.synced = true;
                        u.committed == u.bytes.len() as u64
                    }
                    None => false,
                };
                if done {
                    self.finish_upload(now)?;
                }
            }
            (
                Pending::BlobGet,
                Response::BlobChunk {
                    offset,
                    bytes,
                    committed,
                    ..
                },
            ) => self.on_blob_chunk(now, offset, bytes, committed)?,
            _ => {
                self.event(Event::Warning(
                    "relay sent an answer of the wrong kind".into(),
                ));
                self.drop_connection(now);
            }
        }
        self.pump_history(now)
    }

    pub(crate) fn on_blob_error(
        &mut self,
        now: u64,
        p: Pending,
        e: WireError,
    ) -> Result<(), ClientError> {
        self.history.in_flight = false;
        match p {
            Pending::BlobPut | Pending::BlobStatus => {
                // The relay refused the archive (too large, expired…):
                // give up rather than retry a refusal for ever.
                if let Some(u) = self.history.upload.take() {
                    self.history.state.owed.remove(&u.to);
                    self.touch(Dirty::Xfer);
                    self.event(Event::Warning(format!(
                        "history upload refused: {:?}",
                        e.code
                    )));
                }
            }
            _ => {
                self.event(Event::Warning(format!(
                    "history download refused: {:?}",
                    e.code
                )));
                self.abandon_import();
            }
        }
        let _ = now;
        Ok(())
    }

    fn finish_upload(&mut self, now: u64) -> Result<(), ClientError> {
        let Some(u) = self.history.upload.take() else {
            return Ok(());
        };
        self.queue_control(
            now,
            u.to,
            Body::HistoryOffer {
                blob: u.blob.0,
                key: crate::payload::ArchiveKey(*u.key),
                total_len: u.bytes.len() as u64,
                chunks: u.chunks,
                messages: u.messages,
            },
        )?;
        self.history.state.owed.remove(&u.to);
        self.touch(Dirty::Xfer);
        self.event(Event::HistoryExported {
            device: u.to,
            messages: u.messages,
        });
        Ok(())
    }

    pub(crate) fn on_history_offer(
        &mut self,
        d: DeviceId,
        blob: [u8; 16],
        key: &crate::payload::ArchiveKey,
        total_len: u64,
        chunks: u32,
        messages: u64,
    ) {
        let expected = self.history.state.requested == Some(d)
            && self.history.state.incoming.is_none()
            && !self.history.state.done;
        if !expected {
            self.reject();
            return;
        }
        self.history.state.incoming = Some(Incoming {
            blob: BlobId(blob),
            key: SecretKey(key.0),
            total_len,
            chunks,
            messages,
            offset: 0,
            next_chunk: 0,
            imported: 0,
        });
        self.history.buf.clear();
        self.touch(Dirty::Xfer);
        self.event(Event::HistoryImport {
            done: 0,
            total: messages,
        });
    }

    fn abandon_import(&mut self) {
        self.history.state.incoming = None;
        self.history.state.done = true;
        self.history.state.live_ids.clear();
        self.history.buf.clear();
        self.touch(Dirty::Xfer);
    }

    fn on_blob_chunk(
        &mut self,
        now: u64,
        offset: u64,
        bytes: Vec<u8>,
        committed: u64,
    ) -> Result<(), ClientError> {
        let Some(inc) = self.history.state.incoming.clone() else {
            return Ok(());
        };
        if offset != inc.offset + self.history.buf.len() as u64 {
            // A stale answer (from before a reconnect): ask again.
            return Ok(());
        }
        let got = bytes.len() as u64;
        self.history.buf.extend_from_slice(&bytes);
        let mut inc = inc;
        loop {
            let before = self.history.buf.len();
            let opened = open_next_chunk(
                &inc.key.0,
                &inc.blob,
                inc.next_chunk,
                inc.chunks,
                &mut self.history.buf,
            );
            match opened {
                Ok(Some(messages)) => {
                    inc.offset += (before - self.history.buf.len()) as u64;
                    inc.next_chunk += 1;
                    inc.imported += messages.len() as u64;
                    for m in messages {
                        self.import_message(now, m)?;
                    }
                    self.event(Event::HistoryImport {
                        done: inc.imported,
                        total: inc.messages,
                    });
                    if inc.next_chunk == inc.chunks {
                        if !self.history.buf.is_empty() || inc.offset != inc.total_len {
                            self.event(Event::Warning(
                                "history import: bytes after the last chunk".into(),
                            ));
                        }
                        self.abandon_import();
                        return Ok(());
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.event(Event::Warning(format!("history import failed: {e}")));
                    self.abandon_import();
                    return Ok(());
                }
            }
        }
        if got == 0 && committed >= inc.total_len {
            self.event(Event::Warning(
                "history import failed: history archive: truncated".into(),
            ));
            self.abandon_import();
            return Ok(());
        }
        self.history.state.incoming = Some(inc);
        self.touch(Dirty::Xfer);
        Ok(())
    }

    fn import_message(&mut self, now: u64, m: ArchivedMessage) -> Result<(), ClientError> {
        let _ = now;
        let r = m.record;
        let st = &mut self.history.state;
        if st.live_ids.contains(&r.id) {
            return Ok(());
        }
        if r.id.timestamp_ms().saturating_add(OVERLAP_MS) >= st.joined_ms {
            st.imported_recent.insert(r.id);
        }
        let order = st.next_import_order;
        st.next_import_order = order.saturating_add(1);
        if r.outgoing {
            self.mine.insert((r.conversation, r.id), r.stored_at_ms);
            self.touch(Dirty::Mine(r.conversation, r.id));
        }
        self.history_ops.push(StorageOp::Put {
            key: keys::history_message(&r.conversation, &r.id),
            value: storage::encode(&r)?,
        });
        self.history_ops.push(StorageOp::Put {
            key: keys::history_order(&r.conversation, order),
            value: storage::encode(&r.id)?,
        });
        if m.read {
            self.history_ops.push(StorageOp::Put {
                key: keys::history_read(&r.id),
                value: storage::encode(&())?,
            });
        }
        if let Some(state) = m.state {
            self.history_ops.push(StorageOp::Put {
                key: keys::history_state(&r.id),
                value: storage::encode(&state)?,
            });
        }
        Ok(())
    }

    /// Called before a received chat message is stored: `false` if it is a
    /// copy of an imported one (drop it). Notes ids received while an
    /// import is pending.
    pub(crate) fn history_admit(&mut self, id: &MessageId) -> bool {
        let st = &mut self.history.state;
        if st.imported_recent.contains(id) {
            return false;
        }
        if st.want && !st.done && st.live_ids.len() < 100_000 {
            st.live_ids.insert(*id);
            self.touch(Dirty::Xfer);
        }
        true
    }

    /// Import progress: (done, total) while an archive is being imported.
    pub fn history_import_progress(&self) -> Option<(u64, u64)> {
        self.history
            .state
            .incoming
            .as_ref()
            .map(|i| (i.imported, i.messages))
    }

    /// Upload progress: (bytes the relay confirmed as committed, archive
    /// bytes) while an archive is being uploaded (old device).
    pub fn history_upload_progress(&self) -> Option<(u64, u64)> {
        self.history
            .upload
            .as_ref()
            .map(|u| (u.committed, u.bytes.len() as u64))
    }

    /// Download progress: (archive bytes imported, archive bytes) while an
    /// archive is being imported (new device). Only whole chunks count: a
    /// resumed download continues from here.
    pub fn history_download_progress(&self) -> Option<(u64, u64)> {
        self.history
            .state
            .incoming
            .as_ref()
            .map(|i| (i.offset, i.total_len))
    }

    /// Whether an upload is running (old device).
    pub fn history_uploading(&self) -> bool {
        self.history.upload.is_some()
    }

    /// New device: not yet welcomed by the device that issued its link code.
    pub fn awaiting_welcome(&self) -> bool {
        self.device.link.is_some()
    }

    /// New device: the history was asked for and is not imported yet (no
    /// offer yet, or an import under way).
    pub fn history_import_pending(&self) -> bool {
        self.history.state.want && !self.history.state.done
    }

    /// An upload or an import is running, or an export is owed: work a
    /// one-shot command should finish before it exits.
    pub fn history_busy(&self) -> bool {
        self.history.upload.is_some()
            || self.history.state.incoming.is_some()
            || !self.history.state.owed.is_empty()
    }
}

#[cfg(test)]
mod tests;
