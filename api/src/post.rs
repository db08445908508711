//! The API's own store writer, for the events `POST /events` takes.

use std::time::{SystemTime, UNIX_EPOCH};

use ipevent_core::store::{AddrStats, AppendBlocks, StoreError, StoreWriter};
use ipevent_core::{DataDir, IpEvent};
use ipevent_store_s3::shipper::Outbox;

/// The API's own writer: one-record blocks for the events `POST /events` takes.
pub struct PostWriter {
    writer: StoreWriter,
    writer_id: String,
    /// Epoch of the last block. It starts at the start time in microseconds, so epochs keep
    /// growing across restarts as long as fewer than a million events a second are posted.
    epoch: u64,
    /// With `--store`: each event also goes into the API's outbox, shipped to its own
    /// database in the bucket (writer id `api-<host>`), before the answer.
    outbox: Option<Outbox>,
}

impl PostWriter {
    /// A writer for `writer_id` in `data`. Every append is synced to disk before it returns,
    /// because a 202 promises the event will be counted.
    pub fn new(data: DataDir, writer_id: &str) -> Result<PostWriter, StoreError> {
        let start_micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Ok(PostWriter {
            writer: StoreWriter::new(data, writer_id, true)?,
            writer_id: writer_id.to_string(),
            epoch: start_micros,
            outbox: None,
        })
    }

    /// Queues every event for the bucket too (`--store`).
    pub fn ship_through(&mut self, outbox: Outbox) {
        self.epoch = self.epoch.max(outbox.covered_epoch());
        self.outbox = Some(outbox);
    }

    /// Appends one event that arrived at `unix_secs`. With `--store` the outbox entry (synced)
    /// comes first and is what must succeed: the bucket is what the API then reads; the
    /// local log follows, and a failure there is only logged.
    pub fn append(&mut self, event: &IpEvent, unix_secs: u32) -> Result<(), StoreError> {
        self.epoch += 1;
        let records = [(event.ip, AddrStats::one(unix_secs))];
        if let Some(outbox) = &mut self.outbox {
            outbox
                .queue_now(self.epoch, &event.app, &records)
                .map_err(StoreError::Backend)?;
            if let Err(e) = self.writer.append(&event.app, self.epoch, &records) {
                log::warn!("POST /events: queued for the bucket, but the local log failed: {e}");
            }
            return Ok(());
        }
        self.writer.append(&event.app, self.epoch, &records)
    }

    /// Forgets what it knows of its logs: after a reset moved the tree away, the next append
    /// of each app starts a new log.
    pub fn forget_logs(&mut self) {
        self.writer.forget_logs();
    }

    /// Its writer id.
    pub fn writer_id(&self) -> &str {
        &self.writer_id
    }

    /// Forgets what it knows of `app`'s log, which is about to be removed (`DELETE
    /// /events/{sha}`): the next post of that app starts a new log.
    pub fn forget_app(&mut self, app: &ipevent_core::AppSha) -> Result<(), StoreError> {
        self.writer.forget_app(app)
    }
}
