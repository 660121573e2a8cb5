//! Group commit: the one task that writes envelopes to the store.
//!
//! redb runs one write transaction at a time and every durable commit costs
//! two syncs (the envelope segment's `fdatasync`, then redb's commit; see
//! `docs/STORAGE.md` §4), so committing each `Send` separately would cap the
//! relay at a few thousand sends per second whatever the number of clients. Instead connections queue their validated envelopes here; the
//! writer takes the first request, drains whatever else is already queued
//! (up to [`MAX_GROUP_ENVELOPES`]), commits all of it in ONE durable
//! transaction on a blocking thread, then answers every request and wakes the
//! live sessions of the inboxes that grew. Nobody is acknowledged before the
//! commit returned. There is no artificial delay: while one transaction is
//! being synced, the next group accumulates by itself.

use super::hub::DeviceHub;
use crate::metrics::Metrics;
use crate::store::{CommitOutcome, NewEnvelope, Store, StoreError};
use hush_protocol::DeviceId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Most envelopes gathered into one transaction (a group may exceed it by
/// at most one request's batch).
pub const MAX_GROUP_ENVELOPES: usize = 4096;

/// Requests that may wait for the writer before senders are slowed down.
pub const QUEUE_DEPTH: usize = 1024;

/// The result of committing one request's envelopes.
pub type CommitResult = Result<Vec<CommitOutcome>, StoreError>;

/// One connection's envelopes, and where to send their outcomes.
#[derive(Debug)]
pub struct CommitRequest {
    /// Validated envelopes of one `Send`.
    pub envelopes: Vec<NewEnvelope>,
    /// Receives one outcome per envelope, after the commit is durable.
    pub reply: oneshot::Sender<CommitResult>,
}

/// Run the writer until `stop` fires and the queue is drained (or every
/// sender is gone). Requests already queued when `stop` fires are still
/// committed and answered.
pub async fn run(
    mut rx: mpsc::Receiver<CommitRequest>,
    mut stop: oneshot::Receiver<()>,
    store: Arc<dyn Store>,
    hub: Arc<DeviceHub>,
    metrics: Arc<Metrics>,
) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            rx.recv().await
        } else {
            tokio::select! {
                r = rx.recv() => r,
                _ = &mut stop => {
                    // No new requests; drain the queued ones below.
                    stopping = true;
                    rx.close();
                    continue;
                }
            }
        };
        let Some(first) = first else { break };
        let mut count = first.envelopes.len();
        let mut group = vec![first];
        while count < MAX_GROUP_ENVELOPES {
            match rx.try_recv() {
                Ok(r) => {
                    count += r.envelopes.len();
                    group.push(r);
                }
                Err(_) => break,
            }
        }
        commit_group(group, count, &store, &hub, &metrics).await;
    }
    tracing::debug!("commit writer stopped");
}

async fn commit_group(
    group: Vec<CommitRequest>,
    count: usize,
    store: &Arc<dyn Store>,
    hub: &DeviceHub,
    metrics: &Metrics,
) {
    let mut batch = Vec::with_capacity(count);
    let mut replies = Vec::with_capacity(group.len());
    for mut r in group {
        replies.push((r.envelopes.len(), r.reply));
        batch.append(&mut r.envelopes);
    }
    let recipients: Vec<DeviceId> = batch.iter().map(|e| e.recipient).collect();
    let started = Instant::now();
    let store = Arc::clone(store);
    let result = tokio::task::spawn_blocking(move || store.commit(&batch))
        .await
        .unwrap_or_else(|e| Err(StoreError::Backend(format!("commit task failed: {e}"))));
    metrics
        .commit_latency_seconds
        .observe_duration(started.elapsed());
    Metrics::add(&metrics.commit_batches_total, 1);
    metrics.commit_batch_size.observe(count as f64);

    match result {
        Ok(outcomes) if outcomes.len() == count => {
            // Wake the live sessions first: the commit is durable already.
            let mut heads: HashMap<DeviceId, u64> = HashMap::new();
            for (device, outcome) in recipients.iter().zip(&outcomes) {
                if let CommitOutcome::Stored { seq } = outcome {
                    let head = heads.entry(*device).or_insert(0);
                    *head = (*head).max(*seq);
                }
            }
            for (device, seq) in heads {
                hub.notify(&device, seq);
            }
            let mut rest = outcomes.into_iter();
            for (n, reply) in replies {
                let mine: Vec<CommitOutcome> = rest.by_ref().take(n).collect();
                // A connection that went away no longer needs its answer.
                let _ = reply.send(Ok(mine));
            }
        }
        Ok(outcomes) => {
            let msg = format!("store returned {} outcomes for {count}", outcomes.len());
            tracing::error!("{msg}");
            for (_, reply) in replies {
                let _ = reply.send(Err(StoreError::Backend(msg.clone())));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            tracing::error!("group commit of {count} envelopes failed: {msg}");
            for (_, reply) in replies {
                let _ = reply.send(Err(StoreError::Backend(msg.clone())));
            }
        }
    }
}
