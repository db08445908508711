//! The receiver's counters as written to `<data-dir>/receivers/<writer-id>/stats.json`, for
//! operators, the API's `/metrics`, tests and benchmarks.

use std::collections::BTreeMap;
use std::io;

use serde::{Deserialize, Serialize};

use crate::store::{self, DataDir};

/// The stats file is padded to a multiple of this, so that it can be rewritten in place.
const STATS_PAGE_BYTES: usize = 4096;

fn overwrite_in_place(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = store::open_write_existing(path).map_err(io::Error::other)?;
    if file.metadata()?.len() != bytes.len() as u64 {
        return Err(io::Error::other("the stats file has another size"));
    }
    file.write_all_at(bytes, 0)
}

/// A snapshot of one receiver's counters. Counters count from the receiver's start or its
/// last reset, whichever is later.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReceiverStats {
    /// The receiver's writer id.
    pub writer_id: String,
    /// Its process id.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// When it started, unix seconds.
    pub started_unix: u64,
    /// When this snapshot was taken, unix seconds.
    pub updated_unix: u64,
    /// The previous run of this writer stopped cleanly (or there was none).
    pub last_stop_clean: bool,
    /// Addresses it listens on.
    pub listen: Vec<String>,
    /// Receive buffer the kernel granted, per socket, in bytes.
    pub rcvbuf_bytes: Vec<u64>,
    /// Datagrams read from the sockets.
    pub datagrams_received: u64,
    /// Datagrams that decoded into a valid event.
    pub events_accepted: u64,
    /// Datagrams refused, all reasons together.
    pub rejected_total: u64,
    /// Datagrams refused, per reason (`empty`, `oversize`, `truncated`, ...).
    pub rejected: BTreeMap<String, u64>,
    /// Datagrams the kernel dropped before we could read them (SO_RXQ_OVFL).
    pub kernel_drops: u64,
    /// Times ingest found every batch of its pool in use (the cap of 4096 batches) and waited
    /// for the writer; the kernel buffer took the burst meanwhile.
    pub batch_pool_waits: u64,
    /// Times the writer's bookkeeping of its logs reached its cap (262,144 apps) and was
    /// forgotten; each log is verified again the next time it is appended to.
    pub tracked_logs_forgotten: u64,
    /// Accepted events dropped by a store limit, or because something other than a plain
    /// directory or file (a planted symlink, say) stands where the app's directory or log
    /// belongs (all reasons together, see `refused`).
    pub events_refused: u64,
    /// Refused events per reason: `app_limit` (`--max-apps`), `low_disk`, `not_a_directory`
    /// (something planted where an app's directory belongs), `address_limit`
    /// (`--max-addresses-per-app`: a new address of an app that has as many as allowed).
    pub refused: BTreeMap<String, u64>,
    /// Events written to the store.
    pub events_flushed: u64,
    /// Events accepted but not yet written.
    pub events_pending: u64,
    /// Completed flushes.
    pub flushes: u64,
    /// Flushes that failed to write some app (their events stay pending and are retried).
    pub flush_errors: u64,
    /// Duration of the last flush, milliseconds.
    pub flush_last_ms: f64,
    /// Longest flush, milliseconds.
    pub flush_max_ms: f64,
    /// All flushes together, milliseconds.
    pub flush_total_ms: f64,
    /// Bytes of blocks appended to logs.
    pub store_appended_bytes: u64,
    /// Bytes written by compactions (logs rewritten whole and renamed over).
    pub store_rewritten_bytes: u64,
    /// Compactions (and repairs of a torn tail) done.
    pub compactions: u64,
    /// Current flush epoch.
    pub epoch: u64,
    /// Accepted events the previous run had not flushed, recovered from the journal at start.
    pub events_replayed: u64,
    /// Bytes of the journal in use (accepted events not yet in the store).
    pub journal_used_bytes: u64,
    /// Bytes the journal can hold: the bound on accepted events waiting for the store.
    pub journal_capacity_bytes: u64,
    /// The journal is full and the store cannot be written: ingest waits, and the kernel drops
    /// what its buffer cannot hold (counted in `kernel_drops`).
    pub stalled: bool,
    /// Resets served.
    pub resets: u64,
    /// Apps removed by the retention sweep (`--retain-days`): their newest event was older
    /// than the retention.
    pub apps_expired: u64,
    /// Control connections that arrived while all `MAX_CONTROL_CONNS` (16) were open: the
    /// one that had waited longest for its request was closed to make room (or, when every
    /// open one held a reset, the new one was refused).
    pub control_conns_full: u64,
    /// With `--store`: the bucket and prefix shipped to (never credentials); empty without.
    pub store: String,
    /// Flushes in the outbox not yet shipped to the bucket.
    pub ship_lag_epochs: u64,
    /// Bytes of those flushes on local disk.
    pub outbox_bytes: u64,
    /// Last flush epoch durable in the bucket.
    pub shipped_epoch: u64,
    /// Last flush epoch visible to readers of the bucket.
    pub published_epoch: u64,
    /// Failed attempts to reach or write the bucket (retried).
    pub ship_errors: u64,
    /// Flushes that could not be queued in the outbox (free space below `--min-free-bytes`,
    /// an I/O error); their events are carried into the next flush's entry.
    pub outbox_errors: u64,
    /// Shipping stopped: another process took over this writer's database.
    pub ship_fenced: bool,
}

impl ReceiverStats {
    /// Writes the snapshot atomically (a new file renamed over the old). When the disk is
    /// full, which is when operators most need the counters, it overwrites the old file in
    /// place instead: the JSON is padded to whole pages, so the file keeps its size and
    /// needs no new blocks. A reader may then catch a half-written file and should read again.
    pub fn write(&self, data: &DataDir) -> Result<(), store::StoreError> {
        let mut json = serde_json::to_vec_pretty(self).expect("stats serialise");
        let padded = json.len().div_ceil(STATS_PAGE_BYTES) * STATS_PAGE_BYTES;
        json.resize(padded - 1, b' ');
        json.push(b'\n');
        let path = data.stats_path(&self.writer_id);
        match store::write_atomic(&path, &json) {
            Err(e) if e.is_out_of_space() => overwrite_in_place(&path, &json).map_err(|_| e),
            other => other,
        }
    }

    /// Reads the last snapshot of `writer_id`.
    pub fn read(data: &DataDir, writer_id: &str) -> io::Result<ReceiverStats> {
        let path = data.stats_path(writer_id);
        let bytes = store::read_file(&path)
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    }

    /// The snapshot of every writer in `data` that has one, by writer id; one that cannot be
    /// read is there as its error, so a caller can report it without losing the others.
    pub fn read_all(data: &DataDir) -> io::Result<Vec<(String, io::Result<ReceiverStats>)>> {
        let ids = data.writer_ids().map_err(io::Error::other)?;
        Ok(ids
            .into_iter()
            .filter_map(|id| match ReceiverStats::read(data, &id) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                result => Some((id, result)),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_symlink_is_never_written_through_or_read() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("data"));
        let stats = ReceiverStats {
            writer_id: "w".into(),
            ..ReceiverStats::default()
        };
        store::create_dir_all(&data.receiver_dir("w")).unwrap();
        // A file outside the tree, of the size the fallback would overwrite in place.
        let victim = dir.path().join("victim");
        let original = vec![b'x'; STATS_PAGE_BYTES];
        std::fs::write(&victim, &original).unwrap();
        std::os::unix::fs::symlink(&victim, data.stats_path("w")).unwrap();

        let page = vec![b' '; STATS_PAGE_BYTES];
        assert!(overwrite_in_place(&data.stats_path("w"), &page).is_err());
        assert!(ReceiverStats::read(&data, "w").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), original);

        // The normal path replaces the link itself, never its target.
        stats.write(&data).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), original);
        assert_eq!(ReceiverStats::read(&data, "w").unwrap(), stats);
    }
}
