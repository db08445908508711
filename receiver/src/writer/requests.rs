//! The control requests the writer serves once every ingest thread has drained for them:
//! `sync` (flush, then answer), and the holds of a reset (`reset-begin`, `reset-end`) and of a
//! forget (`forget <sha>`, begun in [`super::forget`]).

use std::os::unix::net::UnixStream;

use ipevent_core::aggregate::Pending;
use ipevent_core::control::{ForgetBegun, Reply, ResetBegun, ResetEnded, Synced};

use super::Writer;
use crate::control::{self, Op};

impl Writer {
    /// Serves, in id order, every request whose markers are all in.
    pub(super) fn run_ready_requests(&mut self) {
        while let Some(entry) = self.waiting.first_entry() {
            let (seen, request) = entry.get();
            if request.as_ref().is_none_or(|r| *seen < r.markers) {
                return;
            }
            if let (_, Some(request)) = entry.remove() {
                self.serve(request.op);
            }
        }
    }

    /// Serves one request. The stats file is rewritten before each answer, so a client that
    /// reads it after the answer sees what the request did.
    fn serve(&mut self, op: Op) {
        let mut answers: Vec<(UnixStream, Reply)> = Vec::new();
        match op {
            Op::Sync { reply } if !self.holds.is_empty() => {
                if self.held_syncs.len() < control::MAX_HELD_SYNCS {
                    self.held_syncs.push(reply);
                } else {
                    let busy = "too many syncs are waiting for a reset to end; try again";
                    answers.push((reply, Reply::Refused(busy.into())));
                }
            }
            Op::Sync { reply } => {
                let failed = self.flush();
                answers.push((reply, self.sync_reply(failed)));
            }
            Op::BeginHold { hold, reply } => {
                let dropped_pending = self.begin_hold(hold);
                answers.push((reply, Reply::ResetBegun(ResetBegun { dropped_pending })));
            }
            Op::BeginForget {
                hold,
                app,
                shipped,
                reply,
            } => {
                let answer = match self.begin_forget(hold, &app, shipped) {
                    Ok(()) => Reply::ForgetBegun(ForgetBegun { epoch: self.epoch }),
                    Err(why) => Reply::Refused(why),
                };
                answers.push((reply, answer));
            }
            Op::EndHold { hold, reply } => {
                let ended = if self.end_hold(hold) {
                    Reply::ResetEnded(ResetEnded { epoch: self.epoch })
                } else {
                    Reply::Refused("this reset's hold had already ended (lease)".into())
                };
                answers.extend(reply.map(|stream| (stream, ended)));
                if self.holds.is_empty() && !self.held_syncs.is_empty() {
                    let failed = self.flush();
                    let synced = self.sync_reply(failed);
                    answers.extend(self.held_syncs.drain(..).map(|s| (s, synced.clone())));
                }
            }
        }
        self.write_stats();
        for (stream, reply) in answers {
            control::answer(&stream, &reply);
        }
    }

    /// `reset-begin`: drops what is pending, zeroes the counters and holds flushes. Returns
    /// how many pending events were dropped.
    fn begin_hold(&mut self, hold: u64) -> u64 {
        let dropped = self.pending.events();
        self.pending = Pending::default();
        if let Some(outbox) = &mut self.outbox {
            outbox.discard_carried();
        }
        self.journal.rewind();
        self.counters.zero();
        let resets = self.stats.resets + 1;
        self.stats = self.settings.stats_base.clone();
        self.stats.resets = resets;
        self.holds.insert(hold);
        log::info!("reset: dropped {dropped} pending events; flushes held");
        dropped
    }

    /// Ends hold `hold`; false when it had already ended.
    fn end_hold(&mut self, hold: u64) -> bool {
        let was_held = self.holds.remove(&hold);
        let what = if self.forgets.remove(&hold) {
            "forget"
        } else {
            // The tree may have been moved away: what we knew of our logs no longer holds.
            self.store.forget_logs();
            "reset"
        };
        if was_held && self.holds.is_empty() {
            log::info!("{what} over; flushes resumed");
        }
        was_held
    }

    /// The answer to a sync whose flush left `failed` apps unwritten.
    fn sync_reply(&self, failed: usize) -> Reply {
        if failed == 0 {
            Reply::Synced(Synced { epoch: self.epoch })
        } else {
            Reply::Refused(format!(
                "{failed} apps could not be written; see the receiver's log"
            ))
        }
    }

    pub(super) fn answer_held_syncs(&mut self, failed: usize) {
        let reply = self.sync_reply(failed);
        for stream in self.held_syncs.drain(..) {
            control::answer(&stream, &reply);
        }
    }
}
