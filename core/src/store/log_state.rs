//! What a writer knows of each of its logs: where the next run goes, how its runs stand (what
//! decides a compaction), its events, distinct addresses and highest epoch. Learnt from the
//! log the first time the writer touches it, then kept up to date by every append, and
//! bounded to [`MAX_TRACKED_LOGS`] apps.

use rustc_hash::FxHashMap;
use std::path::Path;

use super::compact;
use super::fsio::{map_read, StoreError};
use crate::block::{self, Tail};
use crate::wire::AppSha;

/// The writer forgets what it knows of logs beyond this many apps (and re-verifies a log the
/// next time it appends to it), so its bookkeeping stays bounded under a flood of new apps.
pub const MAX_TRACKED_LOGS: usize = 1 << 18;

/// What the writer knows of one of its logs.
#[derive(Debug, Clone, Copy)]
pub(super) struct LogState {
    /// Length of the verified prefix: where the next block goes.
    pub(super) good_len: u64,
    /// Bytes of the base run (what the last rewrite wrote, or the first block).
    pub(super) base_bytes: u64,
    /// Runs appended after the base, and their bytes: what decides a compaction.
    pub(super) tail_runs: u32,
    pub(super) tail_bytes: u64,
    /// Events in the log: what the app index says of it.
    pub(super) events: u64,
    /// Distinct addresses in the log, or an upper bound when `distinct_exact` is false.
    pub(super) distinct: u64,
    pub(super) distinct_exact: bool,
    /// Highest epoch of its blocks: which journaled records it already holds.
    pub(super) max_epoch: u64,
    /// The tail holds bytes that are no verified block (a failed or torn write): the next
    /// append rewrites the log instead.
    pub(super) needs_rewrite: bool,
    /// The app's directory is known to exist as a plain directory.
    pub(super) dir_ready: bool,
    /// The log does not exist yet (its directory was just made): it is created exclusively,
    /// and needs no check of its length.
    pub(super) is_new: bool,
}

impl LogState {
    /// A log that does not exist yet.
    pub(super) const EMPTY: LogState = LogState {
        good_len: 0,
        base_bytes: 0,
        tail_runs: 0,
        tail_bytes: 0,
        events: 0,
        distinct: 0,
        distinct_exact: true,
        max_epoch: 0,
        needs_rewrite: false,
        dir_ready: false,
        is_new: false,
    };

    /// The log of an app whose directory was just created.
    pub(super) fn created() -> LogState {
        LogState {
            dir_ready: true,
            is_new: true,
            ..LogState::EMPTY
        }
    }

    /// A log just rewritten as one sorted run of `len` bytes (its new base).
    pub(super) fn rewritten(len: u64, events: u64, distinct: u64, max_epoch: u64) -> LogState {
        LogState {
            good_len: len,
            base_bytes: len,
            events,
            distinct,
            max_epoch,
            dir_ready: true,
            ..LogState::EMPTY
        }
    }

    /// This log after a run of `written` bytes and `events` events of `epoch` was appended:
    /// the first run of a log is its base, every later one a run of its tail.
    pub(super) fn appended(self, written: u64, events: u64, epoch: u64) -> LogState {
        let first = self.good_len == 0;
        LogState {
            good_len: self.good_len + written,
            base_bytes: if first { written } else { self.base_bytes },
            tail_runs: self.tail_runs + u32::from(!first),
            tail_bytes: self.tail_bytes + if first { 0 } else { written },
            events: self.events + events,
            max_epoch: self.max_epoch.max(epoch),
            needs_rewrite: false,
            is_new: false,
            ..self
        }
    }

    /// This log after an append failed: part of the run may be on disk, so the writer never
    /// appends behind it again and rewrites it instead.
    pub(super) fn torn(self) -> LogState {
        LogState {
            needs_rewrite: true,
            is_new: false,
            ..self
        }
    }

    /// Learns the state of the log at `path` from its verified blocks ([`LogState::EMPTY`]
    /// when there is none).
    pub(super) fn read(path: &Path) -> Result<LogState, StoreError> {
        let Some(map) = map_read(path)? else {
            return Ok(LogState::EMPTY);
        };
        let summary = block::scan_log(map.as_ref(), |_, _| {});
        let layout = compact::run_layout(map.as_ref());
        let state = LogState {
            good_len: summary.good_bytes,
            base_bytes: layout.base_bytes,
            tail_runs: layout.tail_runs,
            tail_bytes: layout.tail_bytes,
            events: summary.events,
            distinct: layout.records,
            distinct_exact: layout.tail_runs == 0 && layout.base_bytes == summary.good_bytes,
            max_epoch: summary.max_epoch,
            needs_rewrite: summary.tail != Tail::Clean,
            dir_ready: true,
            is_new: false,
        };
        if state.needs_rewrite {
            log::warn!(
                "{}: tail after byte {} does not verify; the log will be rewritten without it",
                path.display(),
                state.good_len
            );
        }
        Ok(state)
    }

    /// True when appending `bytes` more should rewrite the log instead (see [`compact`]).
    pub(super) fn wants_compaction(&self, app: &AppSha, bytes: u64) -> bool {
        self.tail_runs + 1 >= compact::compact_limit(app)
            && self.tail_bytes + bytes >= self.base_bytes
    }
}

/// The states of the logs a writer has touched, at most [`MAX_TRACKED_LOGS`] of them.
#[derive(Debug, Default)]
pub(super) struct TrackedLogs {
    logs: FxHashMap<AppSha, LogState>,
    /// Times the bookkeeping reached [`MAX_TRACKED_LOGS`] and was forgotten.
    forgotten: u64,
}

impl TrackedLogs {
    /// What is known of `app`'s log, if anything.
    pub(super) fn get(&self, app: &AppSha) -> Option<LogState> {
        self.logs.get(app).copied()
    }

    /// Keeps `state` as what is known of `app`'s log; forgets every log first when a new app
    /// would go past [`MAX_TRACKED_LOGS`].
    pub(super) fn remember(&mut self, app: &AppSha, state: LogState) {
        if self.logs.len() >= MAX_TRACKED_LOGS && !self.logs.contains_key(app) {
            self.logs.clear();
            self.forgotten += 1;
        }
        self.logs.insert(*app, state);
    }

    /// Forgets what is known of `app`'s log (the app is forgotten); true when something was.
    pub(super) fn remove(&mut self, app: &AppSha) -> bool {
        self.logs.remove(app).is_some()
    }

    /// Forgets every log (after a reset moved the tree away).
    pub(super) fn clear(&mut self) {
        self.logs.clear();
    }

    /// Times the bookkeeping reached [`MAX_TRACKED_LOGS`] and was forgotten.
    pub(super) fn forgotten(&self) -> u64 {
        self.forgotten
    }
}
