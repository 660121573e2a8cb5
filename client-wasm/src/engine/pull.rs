//! Backlog pages: several `Pull`s in flight, used strictly in order.
//!
//! Relay seqs of an inbox are contiguous, so once a page ending at seq `s`
//! says `remaining = R`, the pages after it cover `(s, s+k]`, `(s+k, s+2k]`…
//! (`k` the span of a page) up to `s+R`. Up to [`EngineConfig::pull_depth`]
//! pulls for those ranges are in flight at once, so the relay reads and the
//! network carries the next pages while this device decrypts and commits.
//!
//! The relay is untrusted, so nothing depends on that density. A page is
//! used only if its request's `after` is at or below the cursor: then it
//! holds every envelope the relay has in `(after, last]`, which covers
//! everything above the cursor up to its last seq; what is at or below the
//! cursor is a duplicate and dropped. A page whose `after` is above the
//! cursor (an earlier page was short, withheld or answered out of order)
//! would skip seqs: it is dropped whole and the sync pulls again from the
//! cursor. The cursor therefore never passes a seq that was not fetched.
//!
//! Every pipelined pull is an early frame: it acknowledges only what
//! earlier steps made durable, and leaves before this step's batch is.
//!
//! [`EngineConfig::pull_depth`]: super::EngineConfig::pull_depth

use super::{Dirty, Engine, Event, Pending};
use crate::error::ClientError;
use hush_protocol::{Page, Request};

impl Engine {
    /// The page answering pull `id`, which asked for seqs after `after`.
    pub(crate) fn on_page(
        &mut self,
        now: u64,
        id: u32,
        after: u64,
        page: Page,
    ) -> Result<(), ClientError> {
        self.link.pulls.retain(|&(i, _)| i != id);
        if after > self.cursor.through {
            // It would skip (through, after]: drop it, pull from the cursor.
            self.link.stale_pages = self.link.stale_pages.saturating_add(1);
            self.pump_pulls(true);
            return Ok(());
        }
        let last = page.envelopes.last().map_or(after, |d| d.seq);
        let mut fresh = 0u64;
        for d in page.envelopes {
            if d.seq > self.cursor.through {
                self.process(now, d.seq, &d.envelope, false)?;
                self.cursor.through = d.seq;
                self.touch(Dirty::Cursor);
                fresh += 1;
            } else {
                self.count_duplicate();
            }
        }
        if let Some(t) = page.truncated {
            self.on_truncation(now, &t)?;
        }
        let through = self.cursor.through;
        self.link.sync_done = self.link.sync_done.saturating_add(fresh);
        self.link.sync_total = self.link.sync_done.saturating_add(page.remaining);
        self.event(Event::SyncProgress {
            done: self.link.sync_done,
            total: self.link.sync_total,
        });
        self.link.sync_end = through.saturating_add(page.remaining);
        if page.remaining > 0 {
            // A page that ran into more envelopes spans what the next ones
            // will (fewer than the limit when the relay's byte budget cut it).
            let span = last.saturating_sub(after);
            if span > 0 {
                self.link.pull_stride = span.min(self.page_limit());
            }
            // The next pulls leave before this page is durable and
            // acknowledge only what earlier steps stored; this page's
            // acknowledgement rides on a later pull (or the final ack).
            self.pump_pulls(true);
        } else if self.link.pulls.is_empty() {
            self.link.live = true;
            self.note_caught_up(now);
            self.send_ack();
        }
        // remaining = 0 with pulls still in flight (asked for before the
        // relay's count shrank): their pages decide.
        Ok(())
    }

    /// Envelopes asked for per page.
    fn page_limit(&self) -> u64 {
        u64::from(
            self.cfg
                .page_limit
                .clamp(1, hush_protocol::limits::MAX_PAGE),
        )
    }

    /// Most pulls in flight.
    fn pull_depth(&self) -> usize {
        usize::from(self.cfg.pull_depth.max(1))
    }

    /// Keep the sync going: if no pull in flight continues from the cursor,
    /// pull from it; then add pulls for the following ranges while they are
    /// below the known end of the backlog and fewer than `pull_depth` are in
    /// flight. `early`: as early frames (during a page's step).
    pub(crate) fn pump_pulls(&mut self, early: bool) {
        let through = self.cursor.through;
        let continued =
            self.link.pull_frontier > through && self.link.pulls.iter().any(|&(_, a)| a <= through);
        if !continued {
            self.link.pull_frontier = through;
        }
        let depth = self.pull_depth();
        let stride = match self.link.pull_stride {
            0 => self.page_limit(),
            s => s,
        };
        while self.link.pulls.len() < depth
            && (self.link.pull_frontier == through || self.link.pull_frontier < self.link.sync_end)
        {
            let after = self.link.pull_frontier;
            self.issue_pull(after, early);
            self.link.pull_frontier = after.saturating_add(stride);
        }
    }

    /// Start a sync from the cursor (after authenticating, or when pushes
    /// showed a hole): one pull; the first page tells how many follow.
    pub(crate) fn send_pull(&mut self) {
        // The relay starts its pushes again from the page's end; what was
        // taken early above the cursor comes again (a duplicate then).
        self.link.early_through = 0;
        self.link.pull_frontier = self.cursor.through;
        self.link.ack_due = None;
        self.pump_pulls(false);
    }

    /// Send one `Pull { after }`. As a plain frame it acknowledges the
    /// cursor (this step's batch is durable before it leaves); as an early
    /// frame only what earlier steps stored.
    fn issue_pull(&mut self, after: u64, early: bool) {
        let ack = if early {
            self.durable_cursor.min(self.cursor.through)
        } else {
            self.cursor.through
        };
        self.link.acked_sent = self.link.acked_sent.max(ack);
        let limit = self
            .cfg
            .page_limit
            .clamp(1, hush_protocol::limits::MAX_PAGE);
        let frame =
            self.request_frame(Request::Pull { after, limit, ack }, Pending::Pull { after });
        self.link.pulls.push_back((frame.request_id, after));
        self.link.pulls_sent = self.link.pulls_sent.saturating_add(1);
        self.link.max_pulls_in_flight = self.link.max_pulls_in_flight.max(self.link.pulls.len());
        if early {
            self.step.early_frames.push(frame);
        } else {
            self.step.frames.push(frame);
        }
    }
}
