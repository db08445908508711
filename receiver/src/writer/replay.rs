//! A start: what the previous run accepted and had not flushed is put back from the journal,
//! and the start epoch is settled above every epoch the store or the journal holds.

use ipevent_core::store;

use super::Writer;

impl Writer {
    /// Puts back what the previous run had accepted but not flushed: every journaled record
    /// whose app's log does not yet hold its epoch. First it settles the start epoch: never
    /// lower than an epoch the store or the journal holds, whatever `state.json` says, so that
    /// what is accepted from now on is never mistaken for something already stored.
    pub(super) fn replay(&mut self) {
        let (mut replayed, mut skipped) = (0u64, 0u64);
        let logs = &mut self.store;
        let pending = &mut self.pending;
        let outbox = &mut self.outbox;
        let result = self.journal.replay(|epoch, records| {
            for record in records {
                let in_store = match logs.log_max_epoch(&record.app) {
                    Ok(max_epoch) => max_epoch >= epoch,
                    Err(e) => {
                        log::warn!("journal replay: {e}");
                        false
                    }
                };
                if in_store {
                    skipped += 1;
                    if let Some(outbox) = outbox.as_mut() {
                        outbox.note_replayed(epoch, record);
                    }
                } else {
                    pending.add(std::slice::from_ref(record));
                    replayed += 1;
                }
            }
        });
        let journal_epoch = match result {
            Ok(found) => {
                if found.unverified_bytes > 0 {
                    log::warn!(
                        "journal {}: {} bytes after the last whole batch do not verify and were \
                         not replayed (a write the crash cut short)",
                        self.journal.path().display(),
                        found.unverified_bytes
                    );
                }
                found.max_epoch
            }
            Err(e) => {
                // The journal was readable at open; a read error now is the disk's.
                log::error!("journal replay stopped: {e}");
                0
            }
        };
        let mut start = self
            .settings
            .state_epoch
            .max(self.journal.recorded_epoch())
            .max(journal_epoch);
        if self.journal.recorded_epoch() == 0 {
            // A new journal (or one an earlier build wrote) records no epoch: ask the store.
            match store::max_epoch_of_writer(&self.settings.data, &self.settings.writer_id) {
                Ok(in_store) => start = start.max(in_store),
                Err(e) => log::warn!("finding the highest epoch in the store: {e}"),
            }
        }
        if let Err(e) = self.journal.begin_epoch(start, self.settings.fsync) {
            self.complain(&format!("{e}"));
        }
        self.epoch = start;
        if replayed + skipped > 0 {
            log::info!(
                "journal: recovered {replayed} accepted events the previous run had not flushed \
                 ({skipped} were already in the store)"
            );
        }
        self.stats.events_replayed = replayed;
        if let Some(outbox) = &mut self.outbox {
            outbox.queue_carried(self.epoch);
        }
        self.flush();
    }
}
