//! History transfer to a newly linked device over the in-memory relay of
//! `tests.rs`: order, read marks and delivery states survive, messages that
//! arrive meanwhile are neither lost nor doubled, and cuts of the upload and
//! of the download resume.

use super::history_transfer::export_history;
use super::*;
use crate::payload::Body;
use crate::storage::HistoryEntry;

impl Net {
    /// The driver's part of an export: read the history from storage and
    /// hand it to the engine, for every client that owes one.
    fn run_exports(&mut self) {
        for i in 0..self.clients.len() {
            let Some(device) = self.clients[i].engine.history_export_wanted() else {
                continue;
            };
            let convs: Vec<ConversationId> = self.clients[i]
                .engine
                .contacts()
                .into_iter()
                .map(|(_, _, c)| c)
                .collect();
            let messages = export_history(&self.clients[i].storage, &convs).unwrap();
            let mut step = self.clients[i]
                .engine
                .start_history_export(self.now, device, messages)
                .unwrap();
            let c = &mut self.clients[i];
            c.storage.apply(&step.storage).unwrap();
            c.events.extend(std::mem::take(&mut step.events));
            self.transmit(i, step.frames, false);
            self.settle();
        }
    }

    fn advance_exporting(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.advance(250);
            self.run_exports();
        }
    }

    fn restart(&mut self, i: usize) {
        let c = &mut self.clients[i];
        let records = c.storage.load_state().unwrap();
        c.engine = Engine::load(records, [97; 32], self.cfg.clone()).unwrap();
        c.connected = false;
        c.queue.clear();
        c.pulls_in_flight.clear();
    }

    fn history_of(&self, i: usize, conv: &ConversationId) -> Vec<HistoryEntry> {
        crate::storage::history(&self.clients[i].storage, conv, None, usize::MAX).unwrap()
    }

    fn import_events(&self, i: usize) -> Vec<(u64, u64)> {
        self.clients[i]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::HistoryImport { done, total } => Some((*done, *total)),
                _ => None,
            })
            .collect()
    }
}

/// What a user sees of a conversation: id, text, direction, read, state.
fn shown(h: &[HistoryEntry]) -> Vec<(MessageId, String, bool, bool, Option<MessageState>)> {
    h.iter()
        .map(|e| {
            (
                e.record.id,
                e.record.text.clone(),
                e.record.outgoing,
                e.read,
                e.state,
            )
        })
        .collect()
}

/// Users a (two devices later), b and c; a talks with both. Returns the
/// net, a, and the two conversations.
fn history_fixture(per_conv: usize) -> (Net, usize, [ConversationId; 2]) {
    let mut net = Net::new();
    net.cfg.history_piece_bytes = 2048;
    let a = net.create("a");
    let b = net.create("b");
    let c = net.create("c");
    let ab = net.befriend(a, b);
    let ac = net.befriend(a, c);
    for k in 0..per_conv {
        let (from, conv) = match k % 4 {
            0 => (a, ab),
            1 => (b, ab),
            2 => (a, ac),
            _ => (c, ac),
        };
        net.send(from, conv, &format!("message {k} {}", "x".repeat(k % 50)));
    }
    net.advance(5_000);
    // a reads b's messages up to the middle.
    let ad = net.clients[b].engine.device_id();
    let read: Vec<(MessageId, DeviceId)> = net
        .history_of(a, &ab)
        .iter()
        .filter(|e| !e.record.outgoing)
        .take(per_conv / 8)
        .map(|e| (e.record.id, ad))
        .collect();
    net.command(
        a,
        Command::MarkRead {
            conversation: ab,
            messages: read,
        },
    );
    net.advance(5_000);
    (net, a, [ab, ac])
}

#[test]
fn linked_device_gets_the_history_in_order_with_read_marks_and_states() {
    let (mut net, a, convs) = history_fixture(200);
    let a2 = net.join(a);
    net.advance_exporting(20_000);
    let mut all = Vec::new();
    for conv in &convs {
        let old = shown(&net.history_of(a, conv));
        assert_eq!(old.len(), 100);
        assert_eq!(shown(&net.history_of(a2, conv)), old);
        all.extend(old);
    }
    // The comparison covers read marks and receipts (delivered and read).
    assert_eq!(all.iter().filter(|m| m.3).count(), 25);
    assert!(all.iter().any(|m| m.4 == Some(MessageState::Delivered)));
    let progress = net.import_events(a2);
    assert_eq!(progress.first(), Some(&(0, 200)));
    assert_eq!(progress.last(), Some(&(200, 200)));
    assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0));
    // The relay saw only ciphertext.
    let blobs: Vec<&Vec<u8>> = net.relay.blobs.values().map(|b| &b.2).collect();
    assert_eq!(blobs.len(), 1);
    assert!(!blobs[0].windows(9).any(|w| w == b"message 1"));
}

#[test]
fn messages_arriving_during_the_import_follow_it_once() {
    let (mut net, a, [ab, _]) = history_fixture(40);
    let b = 1;
    // The download stalls (a lost answer) until a2 reconnects.
    net.relay.lose_blob_gets.insert(0);
    let a2 = net.join(a);
    net.advance_exporting(10_000);
    assert!(net.import_events(a2).last().is_some_and(|p| p.0 == 0));
    // Once b's cached list of a's devices is stale, b's messages reach a2.
    net.advance(net.cfg.device_list_fresh_ms);
    let late = net.send(b, ab, "during the import");
    net.advance(3_000);
    assert_eq!(net.import_events(a2).last().map(|p| p.0), Some(0));
    net.disconnect(a2);
    net.advance_exporting(10_000);
    let old = shown(&net.history_of(a, &ab));
    let new = shown(&net.history_of(a2, &ab));
    assert_eq!(new.iter().filter(|m| m.0 == late).count(), 1);
    assert_eq!(new.last().map(|m| m.0), Some(late));
    // Everything else is the old device's history, in its order.
    let old_ids: Vec<_> = old.iter().map(|m| m.0).collect();
    let new_ids: Vec<_> = new.iter().map(|m| m.0).collect();
    assert_eq!(new_ids, old_ids);
}

#[test]
fn a_cut_upload_resumes_where_the_relay_stopped() {
    let (mut net, a, convs) = history_fixture(200);
    // The third put's answer is lost: the connection hangs, then drops.
    net.relay.lose_blob_puts.insert(2);
    let a2 = net.join(a);
    net.advance_exporting(5_000);
    assert!(net.clients[a].engine.history_uploading());
    let puts_before = net.relay.blob_puts;
    net.disconnect(a);
    net.advance_exporting(20_000);
    assert!(!net.clients[a].engine.history_uploading());
    let blob = net.relay.blobs.values().next().unwrap();
    // Resumed, not restarted: one blob, and about one piece per 2 KiB.
    assert_eq!(net.relay.blobs.len(), 1);
    let pieces = blob.2.len().div_ceil(2048);
    assert!(
        net.relay.blob_puts <= pieces + 2,
        "{} puts",
        net.relay.blob_puts
    );
    assert!(puts_before >= 3);
    for conv in &convs {
        assert_eq!(
            shown(&net.history_of(a2, conv)),
            shown(&net.history_of(a, conv))
        );
    }
}

#[test]
fn a_download_cut_by_a_restart_resumes_at_the_first_chunk_not_imported() {
    let (mut net, a, convs) = history_fixture(800);
    // The 30th get is lost: the new device has imported some chunks.
    net.relay.lose_blob_gets.insert(30);
    let a2 = net.join(a);
    net.advance_exporting(10_000);
    let (done, total) = *net.import_events(a2).last().unwrap();
    assert!(done > 0 && done < total, "{done} of {total}");
    net.restart(a2);
    let gets_before = net.relay.blob_gets;
    net.advance_exporting(20_000);
    assert_eq!(net.import_events(a2).last(), Some(&(total, total)));
    // Resumed: the rest of the blob plus at most a chunk again.
    let blob_len = net.relay.blobs.values().next().unwrap().2.len();
    assert!(net.relay.blob_gets - gets_before < blob_len.div_ceil(2048));
    for conv in &convs {
        let new = shown(&net.history_of(a2, conv));
        assert_eq!(new, shown(&net.history_of(a, conv)));
    }
}

#[test]
fn an_offer_from_a_device_that_was_not_asked_is_refused() {
    let (mut net, a, [ab, _]) = history_fixture(8);
    let a2 = net.join(a);
    net.advance_exporting(10_000);
    let before = shown(&net.history_of(a2, &ab));
    // a (a legitimate own device) offers again, unasked: nothing happens.
    let rejected = net.clients[a2].engine.counters().rejected;
    let to = net.clients[a2].engine.device_id();
    let now = net.now;
    net.clients[a]
        .engine
        .queue_control(
            now,
            to,
            Body::HistoryOffer {
                blob: [1; 16],
                key: crate::payload::ArchiveKey([2; 32]),
                total_len: 10,
                chunks: 1,
                messages: 1,
            },
        )
        .unwrap();
    net.advance(5_000);
    assert_eq!(net.clients[a2].engine.counters().rejected, rejected + 1);
    // The key never shows in Debug output.
    let offer = Body::HistoryOffer {
        blob: [1; 16],
        key: crate::payload::ArchiveKey([0xab; 32]),
        total_len: 1,
        chunks: 1,
        messages: 1,
    };
    assert!(!format!("{offer:?}").contains("171"));
    assert_eq!(shown(&net.history_of(a2, &ab)), before);
}

#[test]
fn a_device_that_declined_gets_no_history() {
    let (mut net, a, [ab, _]) = history_fixture(8);
    let Some(Reply::LinkCode(text)) = net.command(a, Command::CreateLinkCode) else {
        panic!("no link code");
    };
    let code = LinkCode::parse(&text).unwrap();
    let (e, s) =
        Engine::join_with_history(net.now, [77; 32], &code, net.cfg.clone(), false).unwrap();
    let a2 = net.add(e, s);
    net.connect(a2);
    net.advance_exporting(10_000);
    assert!(
        net.clients[a2]
            .events
            .iter()
            .any(|e| matches!(e, Event::Linked))
    );
    assert!(net.history_of(a2, &ab).is_empty());
    assert!(net.relay.blobs.is_empty());
}
