//! The connection driver: runs one device's framed conversation over any
//! pair of byte-stream halves.
//!
//! It is generic over `AsyncRead`/`AsyncWrite` so the same code serves a
//! native QUIC bidirectional stream (`hush/1`), a WebTransport
//! bidirectional stream (`h3`, see [`super::webtransport`]) and the byte
//! stream carried by a WebSocket's binary messages (see
//! [`super::websocket`], which feeds it through an in-memory pipe). It owns the
//! transport concerns the sans-IO [`crate::core::RelayCore`] leaves out:
//! reading and framing bytes, time, randomness, running store calls off the
//! async threads, handing envelopes to the group-commit writer, applying a
//! `Pull`'s merged acknowledgement after its page was sent (one at a time,
//! in order), reading a catching-up device's next page while the current
//! one is on its way (see [`crate::core::ReadAhead`]), waking on inbox changes, replacement by a newer connection,
//! the authentication deadline and shutdown.

use super::Shared;
use super::hub::Displaced;
use super::writer::{CommitRequest, CommitResult, WriterMsg};
use crate::cluster::limits::Limit;

/// Longest an authentication waits for its claim to reach the cluster bus
/// (a bus that is down does not keep devices from connecting).
const CLAIM_PUBLISH_BOUND: Duration = Duration::from_secs(2);
use crate::core::{
    Action, DeferredAck, NextPage, Outbound, ReadAhead, SendTicket, Session, short_id,
};
use crate::metrics::Metrics;
use crate::store::{CommitOutcome, NewEnvelope, StoreError};
use hush_protocol::{
    ClientFrame, DeviceId, ErrorCode, FrameBuffer, Request, Response, ServerFrame,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, oneshot, watch};

/// A connection must authenticate within this time (`Hello` then `Auth` or
/// `Register`: two round trips).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame (length field) accepted before authentication: `Hello`,
/// `Auth`, `Register` and `Ping` are a few hundred bytes. A larger one is
/// refused with `TooLarge` as soon as its length prefix arrives, and the
/// connection is closed.
pub const PREAUTH_MAX_FRAME_LEN: usize = 4 * 1024;
/// One-time prekeys left at or below which the owner is told (`PrekeysLow`).
pub const PREKEYS_LOW_MARK: u32 = 10;
/// `Send` requests of one connection that may await their commit at once;
/// beyond this the driver stops reading (backpressure).
pub const MAX_IN_FLIGHT_SENDS: usize = 16;
/// Envelopes of one connection staged for the writer before they are handed
/// over even though more frames are buffered (the writer's group bound is
/// far above this; this only keeps one hand-off from growing without limit).
const MAX_STAGED_ENVELOPES: usize = 256;
/// Bound on writing the last frames of a closing connection.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pages the relay holds read ahead at once, over all connections: with
/// pages of at most `MAX_PAGE_BYTES` (2 MiB) plus one envelope, about
/// 70 MiB at most. Beyond it, catch-ups simply read when asked.
pub const MAX_READS_AHEAD: usize = 32;
/// A page read ahead that no `Pull` asked for within this time is dropped,
/// so a device that stops pulling does not hold one of the relay's
/// [`MAX_READS_AHEAD`].
const READ_AHEAD_KEPT: Duration = Duration::from_secs(2);
/// A read ahead made on the connection's own task that took longer than
/// this (a cold page cache, a slow disk) sends this connection's later
/// reads ahead to a blocking thread (see [`Conn::start_read_ahead`]).
const INLINE_READ_LIMIT: Duration = Duration::from_millis(1);
/// Envelopes a catching-up connection acknowledges before its acks are
/// applied: acks are cumulative, so one deletion of this many costs one
/// write transaction instead of one per page.
pub const ACKS_HELD: u64 = 1000;
/// Longest an ack is held back: a device that stops pulling mid-way (an
/// app sent to the background) gets its acks applied anyway.
const ACK_HELD_FOR: Duration = Duration::from_secs(1);
/// Read buffer size.
const READ_CHUNK: usize = 16 * 1024;
/// Read size before authentication: one maximal pre-authentication frame.
const PREAUTH_READ: usize = 4 + PREAUTH_MAX_FRAME_LEN;
const _: () = assert!(PREAUTH_READ <= READ_CHUNK);

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// The source address (the limits per address use it).
    pub(crate) addr: std::net::SocketAddr,
    /// The QUIC connection, whose receive window grows once the peer
    /// authenticates (`None` where there is nothing to grow).
    pub(crate) connection: Option<quinn::Connection>,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverEnd {
    /// The peer closed its side of the stream.
    PeerClosed,
    /// A newer connection of the same device took over.
    Replaced,
    /// The device's user removed it while it was connected.
    Removed,
    /// The relay is shutting down.
    ShuttingDown,
    /// The relay closed the connection over a protocol violation.
    Refused {
        /// The wire code sent to the peer.
        code: ErrorCode,
        /// Why.
        reason: String,
    },
    /// The connection did not authenticate within [`AUTH_TIMEOUT`].
    AuthTimeout,
    /// The transport failed (reset, timeout, connection lost).
    Transport(String),
}

enum Flow {
    Continue,
    End(DriverEnd),
}

/// `Send`s handed to the writer as one request: their tickets, each with
/// its count of envelopes (in commit order), and the one answer.
struct InFlight {
    tickets: Vec<(SendTicket, usize)>,
    rx: oneshot::Receiver<CommitResult>,
}

/// A page being read ahead of its `Pull`, holding one of the relay's
/// [`MAX_READS_AHEAD`] until it is used or dropped.
struct Ahead {
    at: NextPage,
    read: Reading,
    until: tokio::time::Instant,
    _permit: OwnedSemaphorePermit,
}

/// A read ahead: made already, or running on a blocking thread.
enum Reading {
    Done(Option<ReadAhead>),
    Running(tokio::task::JoinHandle<Option<ReadAhead>>),
}

/// `Send`s validated but not yet handed to the writer.
#[derive(Default)]
struct Staged {
    envelopes: Vec<NewEnvelope>,
    tickets: Vec<(SendTicket, usize)>,
}

struct Conn {
    shared: Arc<Shared>,
    peer: Peer,
    conn_id: u64,
    session: Session,
    frames: FrameBuffer,
    /// Batches of `Send`s waiting for the writer, in the order they were
    /// queued (the writer answers in that order).
    pending: VecDeque<InFlight>,
    /// `Send` requests in `pending` (what [`MAX_IN_FLIGHT_SENDS`] bounds).
    in_flight: usize,
    /// Validated `Send`s of the frames being processed, not yet handed to
    /// the writer: the frames of one read go to it as one request (one
    /// queue message and one wake-up, one answer to wait for).
    staged: Staged,
    device: Option<DeviceId>,
    inbox: Option<watch::Receiver<u64>>,
    replaced: Option<oneshot::Receiver<Displaced>>,
    /// Notices that other devices ran this device's one-time prekeys low.
    prekeys_low: Option<watch::Receiver<Option<u32>>>,
    /// The merged ack of the last `Pull`, applied after its page was sent
    /// (at most one at a time, so a connection's acks apply in order), and
    /// the seq it acknowledges up to.
    ack_task: Option<(u64, tokio::task::JoinHandle<()>)>,
    /// The merged ack of the last `Pull` of a catch-up, held back until
    /// [`ACKS_HELD`] envelopes are acknowledged (see [`Conn::start_ack`]).
    held_ack: Option<DeferredAck>,
    /// When the held ack is applied at the latest.
    held_until: Option<tokio::time::Instant>,
    /// The highest ack handed to an ack task on this connection.
    ack_handed: u64,
    /// The next page of a catch-up, read while the last one is on its way.
    ahead: Option<Ahead>,
    /// Whether reads ahead run on this task (see [`Conn::start_read_ahead`]).
    read_inline: bool,
}

/// Serve one connection until it ends; returns why it ended. The caller
/// closes the transport (with a code derived from the result).
pub(crate) async fn drive<R, W>(
    shared: Arc<Shared>,
    peer: Peer,
    reader: &mut R,
    writer: &mut W,
) -> DriverEnd
where
    R: AsyncRead + Unpin + Send,
    W: FrameSink,
{
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let now = shared.clock.now_ms();
    let read_inline = shared.core.store().local_reads();
    let mut conn = Conn {
        session: shared.core.new_session(now),
        shared,
        peer,
        conn_id,
        frames: FrameBuffer::new(),
        pending: VecDeque::new(),
        in_flight: 0,
        staged: Staged::default(),
        device: None,
        inbox: None,
        replaced: None,
        prekeys_low: None,
        ack_task: None,
        held_ack: None,
        held_until: None,
        ack_handed: 0,
        ahead: None,
        read_inline,
    };
    let end = conn.run(reader, writer).await;
    conn.shared.core.end_session(&conn.session);
    // The last deferred ack lands before the connection counts as ended.
    conn.finish_ack().await;
    conn.inbox = None;
    conn.replaced = None;
    conn.prekeys_low = None;
    if let Some(device) = conn.device {
        conn.shared.hub.release(device, conn.conn_id);
        tracing::debug!(device = %short_id(&device), end = ?end, "connection ended");
    }
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, writer.shutdown()).await;
    end
}

/// Sleep until `deadline`, or forever if there is none.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next commit answer, in queue order (pending forever if none).
async fn next_commit(pending: &mut VecDeque<InFlight>) -> CommitResult {
    match pending.front_mut() {
        Some(batch) => (&mut batch.rx)
            .await
            .unwrap_or_else(|_| Err(StoreError::Backend("commit writer stopped".into()))),
        None => std::future::pending().await,
    }
}

/// Split one writer answer among the `Send`s it covers (each ticket with its
/// count of envelopes, in commit order) and build their `Sent` frames.
fn finish_batch(
    core: &crate::core::RelayCore<dyn crate::store::Store>,
    tickets: Vec<(SendTicket, usize)>,
    result: CommitResult,
    frames: &mut Vec<ServerFrame>,
) {
    match result {
        Ok(outcomes) if tickets.len() == 1 => {
            if let Some((ticket, _)) = tickets.into_iter().next() {
                frames.push(core.finish_send(ticket, Ok(outcomes)));
            }
        }
        Ok(outcomes) => {
            let expected: usize = tickets.iter().map(|(_, n)| n).sum();
            if outcomes.len() != expected {
                let msg = format!("writer returned {} outcomes for {expected}", outcomes.len());
                for (ticket, _) in tickets {
                    frames.push(core.finish_send(ticket, Err(StoreError::Backend(msg.clone()))));
                }
                return;
            }
            let mut rest = outcomes.into_iter();
            for (ticket, n) in tickets {
                let mine: Vec<CommitOutcome> = rest.by_ref().take(n).collect();
                frames.push(core.finish_send(ticket, Ok(mine)));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for (ticket, _) in tickets {
                frames.push(core.finish_send(ticket, Err(StoreError::Backend(msg.clone()))));
            }
        }
    }
}

/// Why the hub told this connection to close (a newer connection claimed
/// the device, or the device was removed); `None` if the hub dropped it.
async fn wait_replaced(rx: &mut Option<oneshot::Receiver<Displaced>>) -> Option<Displaced> {
    let Some(r) = rx.as_mut() else {
        return std::future::pending().await;
    };
    let why = r.await.ok();
    *rx = None;
    why
}

/// The count of a new `PrekeysLow` notice for this device.
async fn prekeys_ran_low(rx: &mut Option<watch::Receiver<Option<u32>>>) -> Option<u32> {
    let Some(r) = rx.as_mut() else {
        return std::future::pending().await;
    };
    if r.changed().await.is_err() {
        *rx = None;
        return None;
    }
    *r.borrow_and_update()
}

/// True when the device's inbox gained envelopes.
async fn inbox_changed(rx: &mut Option<watch::Receiver<u64>>) -> bool {
    let Some(r) = rx.as_mut() else {
        return std::future::pending().await;
    };
    let ok = r.changed().await.is_ok();
    if !ok {
        *rx = None;
    }
    ok
}

impl Conn {
    async fn run<R, W>(&mut self, reader: &mut R, writer: &mut W) -> DriverEnd
    where
        R: AsyncRead + Unpin + Send,
        W: FrameSink,
    {
        let auth_deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
        let mut shutdown = self.shared.shutdown.clone();
        let mut buf = vec![0u8; READ_CHUNK];
        // Once set, no more requests are read: answer the pending sends, then end.
        let mut draining: Option<DriverEnd> = None;
        if *shutdown.borrow_and_update() {
            draining = Some(DriverEnd::ShuttingDown);
        }
        loop {
            if let Some(end) = &draining
                && self.pending.is_empty()
            {
                let end = end.clone();
                self.farewell(&end, writer).await;
                return end;
            }
            let reading = draining.is_none() && self.in_flight < MAX_IN_FLIGHT_SENDS;
            tokio::select! {
                result = next_commit(&mut self.pending) => {
                    let Some(batch) = self.pending.pop_front() else { continue };
                    self.in_flight = self.in_flight.saturating_sub(batch.tickets.len());
                    let mut frames = Vec::with_capacity(batch.tickets.len());
                    finish_batch(&self.shared.core, batch.tickets, result, &mut frames);
                    // One group commit usually makes several of this
                    // connection's sends durable at once: answer every one
                    // that is already done (in order) with one write, so
                    // their acks share packets instead of one each.
                    while let Some(result) = self.pending.front_mut().and_then(|b| match b.rx.try_recv() {
                        Ok(result) => Some(result),
                        Err(oneshot::error::TryRecvError::Empty) => None,
                        Err(oneshot::error::TryRecvError::Closed) => {
                            Some(Err(StoreError::Backend("commit writer stopped".into())))
                        }
                    }) {
                        let Some(batch) = self.pending.pop_front() else { break };
                        self.in_flight = self.in_flight.saturating_sub(batch.tickets.len());
                        finish_batch(&self.shared.core, batch.tickets, result, &mut frames);
                    }
                    // While draining the peer may be gone; keep answering the rest.
                    if let Err(e) = write_frames(writer, &frames).await
                        && draining.is_none()
                    {
                        return e;
                    }
                }
                replaced = wait_replaced(&mut self.replaced), if draining.is_none() => {
                    match replaced {
                        Some(Displaced::Replaced) => draining = Some(DriverEnd::Replaced),
                        Some(Displaced::Removed) => draining = Some(DriverEnd::Removed),
                        None => {}
                    }
                }
                changed = shutdown.changed(), if draining.is_none() => {
                    // A dropped sender also means the relay is going away.
                    let _ = changed;
                    draining = Some(DriverEnd::ShuttingDown);
                }
                changed = inbox_changed(&mut self.inbox), if draining.is_none() && self.session.is_live() => {
                    if changed
                        && let Flow::End(end) = self.pump(writer).await
                    {
                        return end;
                    }
                }
                left = prekeys_ran_low(&mut self.prekeys_low), if draining.is_none() => {
                    if let Some(left) = left {
                        let frame = ServerFrame::PrekeysLow { one_time_prekeys_left: left };
                        if let Err(end) = write_frame(writer, &Outbound::Frame(frame)).await {
                            return end;
                        }
                        Metrics::add(&self.shared.metrics.prekeys_low_notices_total, 1);
                    }
                }
                _ = sleep_until_some(self.held_until) => {
                    self.held_until = None;
                    if let Some(held) = self.held_ack.take() {
                        self.hand_over_ack(held).await;
                    }
                }
                _ = sleep_until_some(self.ahead.as_ref().map(|a| a.until)) => {
                    self.ahead = None;
                    Metrics::add(&self.shared.metrics.read_ahead_wasted_total, 1);
                }
                _ = tokio::time::sleep_until(auth_deadline), if draining.is_none() && self.device.is_none() => {
                    let frame = ServerFrame::closing(ErrorCode::NotAuthenticated, "authentication timed out");
                    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, write_frame(writer, &Outbound::Frame(frame))).await;
                    return DriverEnd::AuthTimeout;
                }
                // Until the peer authenticates it gets only a small read at a
                // time (see `preauth_oversize`).
                read = reader.read(if self.device.is_some() { &mut buf[..] } else { &mut buf[..PREAUTH_READ] }), if reading => {
                    match read {
                        Ok(0) => draining = Some(DriverEnd::PeerClosed),
                        Ok(n) => {
                            self.frames.extend(buf.get(..n).unwrap_or_default());
                            if let Flow::End(end) = self.process_frames(writer).await {
                                return end;
                            }
                        }
                        Err(e) => return DriverEnd::Transport(e.to_string()),
                    }
                }
            }
        }
    }

    /// Handle every complete frame in the buffer.
    async fn process_frames<W>(&mut self, writer: &mut W) -> Flow
    where
        W: FrameSink,
    {
        loop {
            if self.device.is_none()
                && let Some(declared) = self.preauth_oversize()
            {
                tracing::debug!(
                    conn = self.conn_id,
                    declared,
                    "oversized frame before authentication"
                );
                self.shared.core.metrics().refused(ErrorCode::TooLarge);
                Metrics::add(&self.shared.metrics.preauth_oversize_total, 1);
                let error = ServerFrame::error(
                    0,
                    ErrorCode::TooLarge,
                    format!(
                        "frame of {declared} bytes before authentication (at most {PREAUTH_MAX_FRAME_LEN})"
                    ),
                );
                let actions = vec![
                    Action::Send(error.into()),
                    Action::Close {
                        code: ErrorCode::TooLarge,
                        reason: "oversized frame before authentication".into(),
                    },
                ];
                return self.execute(actions, writer).await;
            }
            let (actions, deferred) = match self.frames.next_client_frame() {
                Ok(Some(frame)) => {
                    // Sends stay staged only while sends follow each other:
                    // anything else (which may wait on the store) lets them
                    // go to the writer first.
                    if !matches!(frame.request, Request::Send { .. }) {
                        self.flush_staged().await;
                    }
                    self.handle(frame).await
                }
                Ok(None) => {
                    self.flush_staged().await;
                    return Flow::Continue;
                }
                Err(e) => {
                    tracing::debug!(conn = self.conn_id, "malformed frame: {e}");
                    self.flush_staged().await;
                    (self.shared.core.malformed(&e), None)
                }
            };
            if let Some(ack) = deferred {
                // Noted before the page goes out: a device that reconnects
                // once it has the page finds its ack adopted even if this
                // connection never gets to apply it.
                self.shared.hub.saw_ack(&ack.device, ack.up_to);
            }
            // The next page of a catch-up is read while this one is written:
            // on a blocking thread, started first; or, when reads are local,
            // here, once this page is queued on the transport, whose own
            // task sends it meanwhile.
            if !self.read_inline {
                self.start_read_ahead();
            }
            let flow = self.execute(actions, writer).await;
            if self.read_inline {
                self.start_read_ahead();
            }
            if self.staged.envelopes.len() >= MAX_STAGED_ENVELOPES {
                self.flush_staged().await;
            }
            // The page is on its way; now delete what the pull acknowledged
            // (even if the connection just failed: the device has those
            // envelopes).
            if let Some(ack) = deferred {
                self.start_ack(ack).await;
            }
            if let Flow::End(end) = flow {
                self.flush_staged().await;
                return Flow::End(end);
            }
        }
    }

    /// Hand the staged `Send`s to the writer as one request.
    async fn flush_staged(&mut self) {
        if self.staged.tickets.is_empty() {
            return;
        }
        let Staged { envelopes, tickets } = std::mem::take(&mut self.staged);
        let (tx, rx) = oneshot::channel();
        let request = CommitRequest {
            envelopes,
            sends: tickets.len(),
            reply: tx,
            queued_at: std::time::Instant::now(),
        };
        if let Err(tokio::sync::mpsc::error::SendError(WriterMsg::Commit(refused))) =
            self.shared.commits.send(WriterMsg::Commit(request)).await
        {
            let _ = refused
                .reply
                .send(Err(StoreError::Backend("relay is shutting down".into())));
        }
        self.in_flight += tickets.len();
        self.pending.push_back(InFlight { tickets, rx });
    }

    /// Before authentication: the declared length of the incomplete frame
    /// at the head of the buffer, if it is above [`PREAUTH_MAX_FRAME_LEN`].
    ///
    /// While the head frame is incomplete every buffered byte belongs to
    /// it, so buffered + still wanted is its full size (prefix included).
    /// A complete head frame passed this check while incomplete, or arrived
    /// whole within one read of at most [`PREAUTH_READ`] bytes, so it is
    /// within the limit either way. Malformed lengths are left to the
    /// decoder, which refuses them.
    fn preauth_oversize(&self) -> Option<usize> {
        let wanted = self.frames.wanted().ok()?;
        if wanted == 0 || self.frames.buffered() < 4 {
            return None;
        }
        let declared = (self.frames.buffered() + wanted).saturating_sub(4);
        (declared > PREAUTH_MAX_FRAME_LEN).then_some(declared)
    }

    /// Start reading the page the session's last `Pull` left behind, if
    /// it left one and the relay holds fewer than [`MAX_READS_AHEAD`].
    ///
    /// With a store whose reads are local ([`Store::local_reads`]) the page
    /// is read right here, on this connection's task: handing it to a
    /// blocking thread costs a thread wake-up and a context switch per page,
    /// ~8% of a catch-up's throughput on two cores, for a read that takes
    /// ~0.1 ms from the page cache. A read slower than
    /// [`INLINE_READ_LIMIT`] would hold up the other tasks of this worker
    /// thread, so after one this connection reads on blocking threads again.
    ///
    /// [`Store::local_reads`]: crate::store::Store::local_reads
    fn start_read_ahead(&mut self) {
        let Some(at) = self.session.take_next_page() else {
            return;
        };
        let Ok(permit) = Arc::clone(&self.shared.reads_ahead).try_acquire_owned() else {
            Metrics::add(&self.shared.metrics.read_ahead_skipped_total, 1);
            return;
        };
        let read = if self.read_inline {
            let started = std::time::Instant::now();
            let page = self.shared.core.read_ahead(at);
            if started.elapsed() > INLINE_READ_LIMIT {
                tracing::debug!(
                    conn = self.conn_id,
                    "slow read ahead; reading on blocking threads"
                );
                self.read_inline = false;
            }
            Reading::Done(page)
        } else {
            let shared = Arc::clone(&self.shared);
            Reading::Running(tokio::task::spawn_blocking(move || {
                shared.core.read_ahead(at)
            }))
        };
        if self.ahead.is_some() {
            Metrics::add(&self.shared.metrics.read_ahead_wasted_total, 1);
        }
        self.ahead = Some(Ahead {
            at,
            read,
            until: tokio::time::Instant::now() + READ_AHEAD_KEPT,
            _permit: permit,
        });
    }

    /// The page read ahead for `frame`, if it is a `Pull` of that page
    /// (waiting for the read if it is still running) and the page answers
    /// it (see [`ReadAhead::answers`]). Otherwise the read is dropped, and
    /// counted as wasted.
    async fn take_read_ahead(&mut self, frame: &ClientFrame) -> Option<ReadAhead> {
        let Request::Pull { after, limit, ack } = frame.request else {
            return None;
        };
        let ahead = self.ahead.take()?;
        let at = NextPage::of_pull(self.session.device()?, after, limit, ack);
        let page = if ahead.at == at {
            match ahead.read {
                Reading::Done(page) => page,
                Reading::Running(task) => task.await.unwrap_or_else(|e| {
                    tracing::error!("read-ahead task failed: {e}");
                    None
                }),
            }
        } else {
            None
        };
        let usable = page.filter(|p| p.answers(at));
        if usable.is_none() {
            Metrics::add(&self.shared.metrics.read_ahead_wasted_total, 1);
        }
        usable
    }

    /// Apply the ack an earlier connection of the device received but may
    /// not have applied (`seen`, see [`super::hub::Claim::acks_seen`]), if
    /// it is beyond the cursor the session read, and report the cursor
    /// again in the session and its queued `AuthOk` (`rest`).
    async fn adopt_acks_seen(&mut self, seen: u64, rest: &mut VecDeque<Action>) {
        if seen <= self.session.acked() {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let mut session = self.session.clone();
        let mut queued = std::mem::take(rest);
        let adopted = tokio::task::spawn_blocking(move || {
            let result = shared
                .core
                .adopt_ack(&mut session, seen, queued.make_contiguous());
            (session, queued, result)
        })
        .await;
        match adopted {
            Ok((session, queued, result)) => {
                *rest = queued;
                match result {
                    Ok(()) => self.session = session,
                    // The old connection still applies it; this one is
                    // sent those envelopes again, which clients expect.
                    Err(e) => tracing::warn!("applying an earlier connection's ack failed: {e}"),
                }
            }
            // The queued answers went with the task: end the connection
            // rather than leave it without an `AuthOk`.
            Err(e) => {
                tracing::error!("ack task failed: {e}");
                rest.push_back(Action::Close {
                    code: ErrorCode::Internal,
                    reason: "internal error".into(),
                });
            }
        }
    }

    /// Apply every ack of this connection: hand over the one held back, if
    /// any, and wait for the ack in flight.
    async fn finish_ack(&mut self) {
        self.held_until = None;
        if let Some(held) = self.held_ack.take() {
            self.hand_over_ack(held).await;
        }
        self.wait_ack_task().await;
    }

    /// Wait for the ack in flight, if any.
    async fn wait_ack_task(&mut self) {
        if let Some((_, task)) = self.ack_task.take()
            && let Err(e) = task.await
        {
            tracing::error!("ack task failed: {e}");
        }
    }

    /// A `Pull`'s merged ack, after its page was sent. Nobody waits for it:
    /// a failed ack only means the envelopes are delivered again, which
    /// clients expect.
    ///
    /// While the device catches up, the ack is held back until it covers
    /// [`ACKS_HELD`] envelopes beyond the last one applied, for at most
    /// [`ACK_HELD_FOR`]: being cumulative, the newest ack replaces the held
    /// one. A live session's acks, and anything that must see the acks
    /// applied (a request that reads at or below them, the end of the
    /// connection), apply it at once.
    /// Until then those envelopes stay stored and count against the inbox's
    /// quota; a relay that stops loses nothing but delivers them again, as
    /// it does for acks not yet synced to disk.
    async fn start_ack(&mut self, ack: DeferredAck) {
        if !self.session.is_live() && ack.up_to < self.ack_handed.saturating_add(ACKS_HELD) {
            if self.held_ack.is_none() {
                self.held_until = Some(tokio::time::Instant::now() + ACK_HELD_FOR);
            }
            self.held_ack = Some(ack);
            return;
        }
        self.held_ack = None;
        self.held_until = None;
        self.hand_over_ack(ack).await;
    }

    /// Apply `ack` on a blocking thread, after the previous one finished.
    async fn hand_over_ack(&mut self, ack: DeferredAck) {
        self.wait_ack_task().await;
        let shared = Arc::clone(&self.shared);
        let task = tokio::task::spawn_blocking(move || {
            if let Err(e) = shared.core.apply_ack(ack) {
                tracing::error!(device = %short_id(&ack.device), "deferred ack failed: {e}");
            }
        });
        self.ack_handed = self.ack_handed.max(ack.up_to);
        self.ack_task = Some((ack.up_to, task));
    }

    /// Run one request through the core. Requests that touch the store run
    /// on a blocking thread; `Send` (validated in memory, committed by the
    /// writer) and `Ping` run inline. A `Pull`'s merged ack comes back
    /// unapplied, to run after the page is sent.
    async fn handle(&mut self, frame: ClientFrame) -> (Vec<Action>, Option<DeferredAck>) {
        let now = self.shared.clock.now_ms();
        let registering = matches!(frame.request, Request::Register { .. });
        let authenticating = registering || matches!(frame.request, Request::Auth { .. });
        if let Some(refusal) = self.check_limits(&frame, now).await {
            return (refusal, None);
        }
        let prekey_target = match (&frame.request, self.device) {
            (Request::FetchPrekeys { device }, Some(_)) => Some(*device),
            _ => None,
        };
        let (mut actions, deferred) = self.handle_request(frame, now).await;
        if authenticating {
            let authenticated = actions
                .iter()
                .any(|a| matches!(a, Action::Authenticated(_)));
            if !authenticated {
                if registering && self.device.is_none() {
                    // Refused registrations do not count against the address.
                    self.shared
                        .limits
                        .refund(Limit::Registration(self.peer_key()));
                }
                // A failed Auth or Register ends the connection: a peer
                // gets one attempt per handshake, not unlimited guesses on
                // a connection already paid for.
                let code = actions
                    .iter()
                    .find_map(|a| match a {
                        Action::Send(Outbound::Frame(ServerFrame::Error { error, .. })) => {
                            Some(error.code)
                        }
                        _ => None,
                    })
                    .unwrap_or(ErrorCode::BadAuth);
                actions.push(Action::Close {
                    code,
                    reason: "authentication failed".into(),
                });
            }
        }
        if let Some(target) = prekey_target {
            let took_one_time = actions.iter().any(|a| {
                matches!(
                    a,
                    Action::Send(Outbound::Frame(ServerFrame::Response {
                        response: Response::Prekeys(bundle),
                        ..
                    })) if bundle.one_time_prekey.is_some()
                )
            });
            if took_one_time {
                self.note_prekeys_taken(target).await;
            }
        }
        (actions, deferred)
    }

    /// The source address as the per-address limits key it.
    fn peer_key(&self) -> std::net::IpAddr {
        super::guard::net_key(self.peer.addr.ip())
    }

    /// Refuse a request the edge limits do not allow (the registrations of
    /// an address, the prekey fetches of a device or of a target), with
    /// `retry_after_ms`. `None` lets it through.
    async fn check_limits(&self, frame: &ClientFrame, now: u64) -> Option<Vec<Action>> {
        let id = frame.request_id;
        let refused = |code: ErrorCode, message: String, wait: u32| {
            self.shared.core.metrics().refused(code);
            let mut error = hush_protocol::WireError::new(code, message);
            error.retry_after_ms = Some(wait);
            ServerFrame::Error {
                request_id: id,
                error,
            }
        };
        match (&frame.request, self.device) {
            (Request::Register { .. }, None) => {
                let taken = self
                    .shared
                    .limits
                    .take(Limit::Registration(self.peer_key()), now)
                    .await;
                let Err(wait) = taken else {
                    return None;
                };
                tracing::debug!(
                    conn = self.conn_id,
                    "registration limit of an address reached"
                );
                let frame = refused(
                    ErrorCode::RegistrationLimit,
                    "too many registrations from this address; retry later".into(),
                    wait,
                );
                Some(vec![
                    Action::Send(frame.into()),
                    Action::Close {
                        code: ErrorCode::RegistrationLimit,
                        reason: "registration limit".into(),
                    },
                ])
            }
            (Request::FetchPrekeys { device: target }, Some(me)) => {
                if let Err(wait) = self.shared.limits.take(Limit::PrekeyFetcher(me), now).await {
                    let frame = refused(
                        ErrorCode::RateLimited,
                        "too many prekey fetches from this device".into(),
                        wait,
                    );
                    return Some(vec![Action::Send(frame.into())]);
                }
                let target = Limit::PrekeyTarget(*target);
                if let Err(wait) = self.shared.limits.take(target, now).await {
                    // This attempt does not count against the requester.
                    self.shared.limits.refund(Limit::PrekeyFetcher(me));
                    let frame = refused(
                        ErrorCode::RateLimited,
                        "too many prekey fetches for this device".into(),
                        wait,
                    );
                    return Some(vec![Action::Send(frame.into())]);
                }
                None
            }
            _ => None,
        }
    }

    /// A fetch took one of `target`'s one-time prekeys: if the pool is now
    /// low, tell the owner's connection so it publishes more.
    async fn note_prekeys_taken(&self, target: DeviceId) {
        let shared = Arc::clone(&self.shared);
        let left =
            tokio::task::spawn_blocking(move || shared.core.store().one_time_prekeys_left(&target))
                .await;
        match left {
            Ok(Ok(left)) if left <= PREKEYS_LOW_MARK => {
                self.shared.hub.prekeys_low(&target, left);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("counting prekeys failed: {e}"),
            Err(e) => tracing::error!("prekey count task failed: {e}"),
        }
    }

    /// Run one request through the core (see [`Conn::handle`]).
    async fn handle_request(
        &mut self,
        frame: ClientFrame,
        now: u64,
    ) -> (Vec<Action>, Option<DeferredAck>) {
        let mut challenge = [0u8; 32];
        if matches!(frame.request, Request::Hello { .. })
            && getrandom::fill(&mut challenge).is_err()
        {
            tracing::error!("system randomness unavailable");
            let actions = vec![
                Action::Send(
                    ServerFrame::error(
                        frame.request_id,
                        ErrorCode::Internal,
                        "relay cannot make a challenge",
                    )
                    .into(),
                ),
                Action::Close {
                    code: ErrorCode::Internal,
                    reason: "randomness unavailable".into(),
                },
            ];
            return (actions, None);
        }
        if matches!(frame.request, Request::Send { .. } | Request::Ping) {
            let actions = self
                .shared
                .core
                .handle(&mut self.session, frame, now, challenge);
            return (actions, None);
        }
        let is_pull = matches!(frame.request, Request::Pull { .. });
        // A request sees the connection's earlier acks applied. The one
        // exception is a pull that reads only above the ack in flight (the
        // usual next page: its `after` or its own ack is at least that
        // high), whose page cannot contain what that ack deletes, so it
        // need not wait for the deletion.
        let pending = self
            .ack_task
            .as_ref()
            .map(|(up_to, _)| *up_to)
            .max(self.held_ack.map(|a| a.up_to));
        let reads_above_pending = match (&frame.request, pending) {
            (Request::Pull { after, ack, .. }, Some(pending)) => (*after).max(*ack) >= pending,
            (Request::Pull { .. }, None) => true,
            _ => false,
        };
        if !reads_above_pending {
            self.finish_ack().await;
        }
        let started = Instant::now();
        if let Some(ahead) = self.take_read_ahead(&frame).await {
            // Served from memory without touching the store: no blocking
            // thread, no hand-off there and back.
            let answer = self.shared.core.handle_deferring_ack(
                &mut self.session,
                frame,
                now,
                challenge,
                Some(ahead),
            );
            self.shared
                .metrics
                .pull_latency_seconds
                .observe_duration(started.elapsed());
            return answer;
        }
        let shared = Arc::clone(&self.shared);
        let mut session = self.session.clone();
        let request_id = frame.request_id;
        let joined = tokio::task::spawn_blocking(move || {
            let (actions, deferred) =
                shared
                    .core
                    .handle_deferring_ack(&mut session, frame, now, challenge, None);
            (session, actions, deferred)
        })
        .await;
        if is_pull {
            self.shared
                .metrics
                .pull_latency_seconds
                .observe_duration(started.elapsed());
        }
        match joined {
            Ok((session, actions, deferred)) => {
                self.session = session;
                (actions, deferred)
            }
            Err(e) => {
                tracing::error!("request task failed: {e}");
                let error = ServerFrame::error(request_id, ErrorCode::Internal, "internal error");
                (vec![Action::Send(error.into())], None)
            }
        }
    }

    /// Push newly committed envelopes to a live session.
    async fn pump<W>(&mut self, writer: &mut W) -> Flow
    where
        W: FrameSink,
    {
        // Mark the change seen BEFORE reading the store: a commit landing
        // after this point triggers another wake-up.
        let head = self.inbox.as_mut().map_or(0, |rx| *rx.borrow_and_update());
        if self.session.wants_early() {
            return self.pump_early(head, writer).await;
        }
        self.pump_durable(head, writer).await
    }

    /// [`Conn::pump`] for a device that asked for early pushes: what a
    /// commit has written goes out before it is durable (as `Push` if it
    /// is durable by now), then the rest as [`Conn::pump_durable`] does,
    /// then a `Durable` for what was pushed early and is durable now.
    async fn pump_early<W>(&mut self, head: u64, writer: &mut W) -> Flow
    where
        W: FrameSink,
    {
        let mut from_memory = false;
        if let Some(device) = self.device
            && let Some(run) = self
                .shared
                .hub
                .early_after(&device, self.session.delivered())
        {
            let durable = run.last().is_some_and(|last| last.seq() <= head);
            if let Some(actions) = self
                .shared
                .core
                .push_fresh(&mut self.session, run, !durable)
            {
                from_memory = true;
                if let Flow::End(end) = self.execute(actions, writer).await {
                    return Flow::End(end);
                }
            }
        }
        // Everything up to the durable head went out from memory, now or
        // early before: no store read.
        let covered = self.session.pushed_early_through(head)
            || (from_memory && self.session.delivered() >= head);
        if !covered && let Flow::End(end) = self.pump_durable(head, writer).await {
            return Flow::End(end);
        }
        match self.shared.core.durable_notice(&mut self.session, head) {
            Some(action) => self.execute(vec![action], writer).await,
            None => Flow::Continue,
        }
    }

    /// Push what the inbox holds durably past what this connection was sent.
    async fn pump_durable<W>(&mut self, head: u64, writer: &mut W) -> Flow
    where
        W: FrameSink,
    {
        // What this node just committed came with the wake-up: push it from
        // memory, with no store read and no hop to a blocking thread (about
        // 60 µs of the ~100 µs a push took on the reference host). Anything
        // else (a backlog, a full window, another node's commit) reads the
        // store.
        if let Some(device) = self.device
            && let Some(fresh) =
                self.shared
                    .hub
                    .fresh_after(&device, self.session.delivered(), head)
            && let Some(actions) = self.shared.core.push_fresh(&mut self.session, fresh, false)
        {
            return self.execute(actions, writer).await;
        }
        let shared = Arc::clone(&self.shared);
        let mut session = self.session.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let actions = shared.core.pump(&mut session);
            (session, actions)
        })
        .await;
        match joined {
            Ok((session, actions)) => {
                self.session = session;
                self.execute(actions, writer).await
            }
            Err(e) => Flow::End(DriverEnd::Transport(format!("push task failed: {e}"))),
        }
    }

    async fn execute<W>(&mut self, actions: Vec<Action>, writer: &mut W) -> Flow
    where
        W: FrameSink,
    {
        let mut actions = VecDeque::from(actions);
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Send(frame) => {
                    if let Err(end) = write_frame(writer, &frame).await {
                        return Flow::End(end);
                    }
                }
                Action::Commit(mut pending) => {
                    // Handed to the writer by `flush_staged`, with the other
                    // sends of the same read.
                    let n = pending.envelopes.len();
                    if self.staged.envelopes.is_empty() {
                        self.staged.envelopes = pending.envelopes;
                    } else {
                        self.staged.envelopes.append(&mut pending.envelopes);
                    }
                    self.staged.tickets.push((pending.ticket, n));
                }
                Action::Authenticated(device) => {
                    let mut claim = self.shared.hub.claim(device, self.conn_id);
                    if let Some(published) = claim.published.take() {
                        // AuthOk (the next action) only once the claim is
                        // in the cluster's order: see `ClusterBus::publish_claim`.
                        let _ = tokio::time::timeout(CLAIM_PUBLISH_BOUND, published).await;
                    }
                    self.device = Some(device);
                    self.inbox = Some(claim.inbox);
                    self.replaced = Some(claim.replaced);
                    self.prekeys_low = Some(claim.prekeys_low);
                    self.adopt_acks_seen(claim.acks_seen, &mut actions).await;
                    // Proven: the connection may now have full-size frames
                    // in flight.
                    if let Some(conn) = &self.peer.connection {
                        conn.set_receive_window(quinn::VarInt::from_u32(
                            super::quic::CONNECTION_RECEIVE_WINDOW,
                        ));
                    }
                    tracing::debug!(device = %short_id(&device), conn = self.conn_id, "authenticated");
                }
                Action::Live(device) => {
                    tracing::trace!(device = %short_id(&device), "live");
                }
                Action::EarlyPushes(device) => {
                    self.shared.hub.enable_early(&device, self.conn_id);
                }
                Action::Evict(device) => {
                    if self.shared.hub.removed(&device) {
                        tracing::debug!(device = %short_id(&device), "removed device's connection closed");
                    }
                }
                Action::Close { code, reason } => {
                    return Flow::End(DriverEnd::Refused { code, reason });
                }
            }
        }
        Flow::Continue
    }

    /// The last frame of a connection the relay ends.
    async fn farewell<W>(&mut self, end: &DriverEnd, writer: &mut W)
    where
        W: FrameSink,
    {
        let frame = match end {
            DriverEnd::Replaced => ServerFrame::closing(
                ErrorCode::Replaced,
                "a newer connection of this device took over",
            ),
            DriverEnd::Removed => ServerFrame::closing(
                ErrorCode::DeviceRemoved,
                "this device was removed by its user",
            ),
            DriverEnd::ShuttingDown => ServerFrame::closing(
                ErrorCode::ShuttingDown,
                "relay is shutting down; reconnect later",
            ),
            _ => return,
        };
        let _ = tokio::time::timeout(
            FINAL_WRITE_TIMEOUT,
            write_frame(writer, &Outbound::Frame(frame)),
        )
        .await;
    }
}

/// Where a connection's frames go: the stream of the transport it came on.
///
/// A frame is built in a buffer of its own and not used again, so a
/// transport that can take the buffer as it is should: a QUIC stream keeps
/// it as one chunk of its send queue, where `write_all` would first copy it
/// into chunks of its own (a page is ~225 KB). Others copy.
pub(crate) trait FrameSink: AsyncWrite + Unpin + Send {
    /// Queue `bytes` on the stream, all of them.
    fn send_owned(&mut self, bytes: Vec<u8>) -> impl Future<Output = std::io::Result<()>> + Send {
        async move { self.write_all(&bytes).await }
    }
}

impl FrameSink for quinn::SendStream {
    async fn send_owned(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        self.write_chunk(bytes.into())
            .await
            .map_err(std::io::Error::from)
    }
}

impl FrameSink for wtransport::SendStream {}

impl<T: AsyncWrite + Send> FrameSink for tokio::io::WriteHalf<T> {}

/// Encode and write one frame.
async fn write_frame<W>(writer: &mut W, frame: &Outbound) -> Result<(), DriverEnd>
where
    W: FrameSink,
{
    write_bytes(writer, or_internal(frame.encode())?).await
}

/// An encoded frame; a frame the core should never have built becomes an
/// `Internal` error frame.
fn or_internal(
    encoded: Result<Vec<u8>, hush_protocol::ProtocolError>,
) -> Result<Vec<u8>, DriverEnd> {
    match encoded {
        Ok(b) => Ok(b),
        Err(e) => {
            // Only a bug can get here (the core builds frames within limits).
            tracing::error!("unencodable server frame: {e}");
            let fallback = ServerFrame::error(0, ErrorCode::Internal, "internal error");
            hush_protocol::encode_server_frame(&fallback)
                .map_err(|e| DriverEnd::Transport(e.to_string()))
        }
    }
}

/// Write frames back to back with one write and one flush.
async fn write_frames<W>(writer: &mut W, frames: &[ServerFrame]) -> Result<(), DriverEnd>
where
    W: FrameSink,
{
    let encode = |frame| or_internal(hush_protocol::encode_server_frame(frame));
    let bytes = match frames {
        [one] => encode(one)?,
        many => {
            let mut all = Vec::new();
            for frame in many {
                all.extend_from_slice(&encode(frame)?);
            }
            all
        }
    };
    write_bytes(writer, bytes).await
}

/// One write and one flush.
async fn write_bytes<W>(writer: &mut W, bytes: Vec<u8>) -> Result<(), DriverEnd>
where
    W: FrameSink,
{
    writer
        .send_owned(bytes)
        .await
        .map_err(|e| DriverEnd::Transport(e.to_string()))?;
    writer
        .flush()
        .await
        .map_err(|e| DriverEnd::Transport(e.to_string()))
}
