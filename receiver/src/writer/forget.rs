//! The writer's side of `forget <sha>` (`ipevent_core::forget`): the hold begins only once
//! nothing of the app is left in memory or in the journal.

use ipevent_core::forget::{REFUSAL_BUSY, REFUSAL_UNSUPPORTED};
use ipevent_core::AppSha;

use super::Writer;

impl Writer {
    /// `forget <sha>`: flushes everything, the app included, so that the journal is rewound
    /// and no replay can bring the app's records back; makes the store writer forget what it
    /// knew of the app's log; and holds flushes while the client moves the app's directory
    /// away. Events that arrive meanwhile stay pending and go into a new log when the hold
    /// ends. Refused, holding nothing, while another hold lasts (the client tries again), when
    /// the flush cannot write everything (nothing is lost: it stays pending), and with
    /// `--store` unless `shipped` (the forget of the bucket, whose shipper removes the app
    /// from the outbox and the database too; a local forget would leave the bucket the app).
    /// With `--store` it also waits (refused as busy) while the outbox could not take a
    /// flush: the journal then still holds what it carries.
    pub(super) fn begin_forget(
        &mut self,
        hold: u64,
        app: &AppSha,
        shipped: bool,
    ) -> Result<(), String> {
        if self.outbox.is_some() && !shipped {
            return Err(format!(
                "{REFUSAL_UNSUPPORTED} this receiver ships to a bucket (--store): forget the \
                 app there (ipevent-query --store … forget), or the bucket would keep it"
            ));
        }
        if self.outbox.as_ref().is_some_and(|o| o.has_carried()) {
            return Err(format!(
                "{REFUSAL_BUSY} the outbox could not take the last flush; try again"
            ));
        }
        if !self.holds.is_empty() {
            return Err(format!(
                "{REFUSAL_BUSY} a reset or another forget is in progress; try again"
            ));
        }
        let failed = self.flush();
        if self.outbox.as_ref().is_some_and(|o| o.has_carried()) {
            return Err(format!(
                "{REFUSAL_BUSY} the outbox could not take the flush; try again"
            ));
        }
        if failed > 0 || !self.pending.is_empty() {
            return Err(format!(
                "{failed} apps could not be written, so the journal still holds them; see the \
                 receiver's log"
            ));
        }
        self.store.forget_app(app).map_err(|e| e.to_string())?;
        self.holds.insert(hold);
        self.forgets.insert(hold);
        log::info!("forget {app}: flushed; flushes held while its data is removed");
        Ok(())
    }
}
