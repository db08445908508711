//! `DELETE /events` (contract 5).
//!
//! A reset holds every receiver (they drain, drop what is pending, zero their counters and
//! stop flushing), moves the whole `events` tree into `trash/` with one rename, puts an empty
//! tree in its place and lets the receivers go. Nothing from before can be reported after
//! that, and everything that arrives after it lands in the new tree. The old tree is deleted
//! in the background: the rename is what makes the reset instant, whatever its size.

use std::time::Duration;

use crate::post::PostWriter;

use ipevent_core::control::{self, Hold};
use ipevent_core::journal;
use ipevent_core::store::{trash, StoreError, WriterLock};
use ipevent_core::DataDir;

/// Why a reset did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// A receiver could not be held; nothing was moved. Worth retrying.
    #[error("{0}")]
    Receivers(String),
    /// The store could not be moved or recreated.
    #[error("{0}")]
    Store(String),
}

/// What a successful reset did.
#[derive(Debug)]
pub struct ResetDone {
    /// Writer ids of the receivers that were held during the reset.
    pub receivers: Vec<String>,
}

/// Resets the store of `data`. The caller must keep `posts` from appending meanwhile (it
/// holds the lock `POST /events` takes).
pub fn reset(
    data: &DataDir,
    posts: &mut PostWriter,
    timeout: Duration,
) -> Result<ResetDone, ResetError> {
    // Each receiver holds its flushes for as long as its `Hold` lives: dropping one (or the
    // death of this process) lets that receiver go.
    let answers = control::hold_all(data, timeout).map_err(|e| {
        ResetError::Store(format!(
            "listing the receivers of {}: {e}",
            data.root().display()
        ))
    })?;
    let mut held = Vec::new();
    let mut refusals = Vec::new();
    for answer in answers {
        match answer.result {
            Ok(hold) => held.push((answer.writer_id, hold)),
            Err(e) => refusals.push(format!("{}: {e}", answer.writer_id)),
        }
    }
    if !refusals.is_empty() {
        return Err(ResetError::Receivers(format!(
            "not reset: receivers could not be held ({})",
            refusals.join("; ")
        )));
    }
    // Receivers that are not running keep accepted records in their journals, which
    // readers count and their next start replays: they go too, under each writer's lock,
    // held until the tree has moved.
    let stopped = match empty_stopped_journals(data) {
        Ok(locks) => locks,
        Err(e) => {
            release(held, timeout);
            return Err(e);
        }
    };
    let moved = trash::move_tree_away(data);
    drop(stopped);
    // The writer's knowledge of its logs is stale once the tree has moved.
    posts.forget_logs();
    let receivers = release(held, timeout);
    let trash = moved.map_err(|e| ResetError::Store(e.to_string()))?;
    if let Some(trash) = trash {
        trash::remove_in_background(trash);
    }
    Ok(ResetDone { receivers })
}

/// Locks every writer of `data` that is not running and removes every record from its
/// journal; returns the locks. A writer that is starting (its lock is taken, its control
/// socket not yet answering) fails the reset, to be retried.
fn empty_stopped_journals(data: &DataDir) -> Result<Vec<WriterLock>, ResetError> {
    let failed = |e: String| ResetError::Store(format!("not reset: {e}"));
    let mut locks = Vec::new();
    for id in data.writer_ids().map_err(|e| failed(e.to_string()))? {
        if data.writer_running(&id) {
            continue;
        }
        let lock = match data.lock_writer(&id) {
            Ok(lock) => lock,
            Err(StoreError::WriterBusy { .. }) => {
                return Err(ResetError::Receivers(format!(
                    "not reset: receiver {id} is starting"
                )));
            }
            Err(e) => return Err(failed(e.to_string())),
        };
        let dropped = journal::drop_all(&data.journal_path(&id)).map_err(|e| {
            failed(format!(
                "emptying the journal of stopped receiver {id}: {e}"
            ))
        })?;
        if dropped > 0 {
            log::info!("reset: removed {dropped} journaled events of stopped receiver {id}");
        }
        locks.push(lock);
    }
    Ok(locks)
}

/// Ends each hold and returns the writer ids; failures are logged (closing the connection
/// ends the hold anyway).
fn release(held: Vec<(String, Hold)>, timeout: Duration) -> Vec<String> {
    held.into_iter()
        .map(|(id, hold)| {
            if let Err(e) = hold.end(timeout) {
                log::warn!("reset: receiver {id} did not confirm the end of the reset: {e}");
            }
            id
        })
        .collect()
}
