//! Forgetting one app everywhere (`ipevent-query forget`, `DELETE /events/:sha`, and the
//! receiver's retention sweep), with the guarantee of the whole-store reset (contract 5) for
//! that app: after [`forget_app`] returns, nothing of the app received before the call is
//! reported, and everything received after it is.
//!
//! It goes through the reset's protocol ([`crate::control`]):
//!
//! 1. Every running receiver is held with `forget <sha>`: it drains its sockets, flushes
//!    everything (so its journal, rewound by that flush, no longer holds the app and no replay
//!    can bring it back), forgets what it knew of the app's log (its app index then reads the
//!    log itself) and holds its flushes. What arrives meanwhile waits in its memory and journal.
//! 2. The caller's own store writer (the API's) forgets the app, and the caller may still
//!    decide not to go on (the retention sweep checks again, now that everything is flushed,
//!    that the app's newest event is old).
//! 3. Every writer that is not running is locked for the rest of the operation, so it cannot
//!    start meanwhile: its journal loses the app's records ([`journal::drop_app`]) and its
//!    app index stops counting the app ([`index::mark_unsettled`]). A writer that runs but
//!    answers no control socket (another API) cannot be reached: the forget is refused.
//! 4. The app's directory, every writer's log at once, is renamed into `trash/`; the holds
//!    end (the receivers write what arrived meanwhile into new logs) and the locks are
//!    released; the moved directory is deleted.
//!
//! Nothing is removed unless every writer was reached: a refusal ends the holds and leaves
//! the store as it was. A receiver or writer busy with another reset or forget is retried
//! until the timeout.

use std::time::{Duration, Instant};

use crate::control::{self, ControlError, Hold};
use crate::journal;
use crate::store::{index, trash, DataDir, StoreError, WriterLock};
use crate::wire::AppSha;

/// Prefix of a receiver's refusal when it is busy with another reset or forget: the request
/// may be retried.
pub const REFUSAL_BUSY: &str = "busy:";

/// Prefix of a receiver's refusal when forgetting is not implemented for its store (with
/// `--store`, the bucket would keep the app).
pub const REFUSAL_UNSUPPORTED: &str = "unsupported:";

/// Prefix of the names of forgotten apps' directories in `trash/`.
pub const TRASH_PREFIX: &str = "app-";

/// Longest pause between two attempts while a writer is busy.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// How long a writer that runs without answering on a control socket is waited for: a
/// receiver that is starting binds its socket within milliseconds of taking its lock, while
/// an ipevent-api never has one.
const UNREACHABLE_WAIT: Duration = Duration::from_secs(1);

/// Why an app was not forgotten. Nothing was removed.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    /// A receiver or writer could not be held or reached. Worth retrying.
    #[error("not forgotten: {0}")]
    Receivers(String),
    /// A receiver's store does not support forgetting (`--store`).
    #[error("not forgotten: {0}")]
    Unsupported(String),
    /// The store could not be listed, or the app's data could not be moved.
    #[error("not forgotten: {0}")]
    Store(String),
}

/// What a forget did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// Whether the store held anything of the app (a directory, or records in a stopped
    /// writer's journal).
    pub found: bool,
    /// False when the caller's check, made while every writer was held, decided not to go on.
    pub removed: bool,
    /// Writer ids of the receivers that were held.
    pub receivers: Vec<String>,
    /// Writer ids of the stopped writers whose journal or index was changed.
    pub stopped_writers: Vec<String>,
    /// Records of the app removed from stopped writers' journals.
    pub journaled: u64,
}

/// Forgets `app` in `data` (see the module's documentation). `own_writer` is the writer id of
/// the calling process's own store writer, if it has one (the API): `while_held` must make it
/// forget the app. `while_held` runs once every running receiver is held and flushed, before
/// anything is removed; it returns whether to go on (`Ok(false)`: nothing is removed). Each
/// control request, and the whole wait for busy writers, is bounded by `timeout`.
pub fn forget_app(
    data: &DataDir,
    app: &AppSha,
    timeout: Duration,
    own_writer: Option<&str>,
    while_held: impl FnMut() -> Result<bool, String>,
) -> Result<Forgotten, ForgetError> {
    forget_in(data, app, timeout, own_writer, false, while_held)
}

/// [`forget_app`] for a forget of the bucket (`--store`), run by a receiver's shipper on its
/// own data dir: the receivers are asked with `forget-shipped`, which they accept with
/// `--store`, and a writer that runs without a control socket (an `ipevent-api` shipping its
/// own posts, which removes the app from its own outbox itself) is left to itself instead of
/// failing the forget.
pub fn forget_app_for_bucket(
    data: &DataDir,
    app: &AppSha,
    timeout: Duration,
    while_held: impl FnMut() -> Result<bool, String>,
) -> Result<Forgotten, ForgetError> {
    forget_in(data, app, timeout, None, true, while_held)
}

fn forget_in(
    data: &DataDir,
    app: &AppSha,
    timeout: Duration,
    own_writer: Option<&str>,
    for_bucket: bool,
    mut while_held: impl FnMut() -> Result<bool, String>,
) -> Result<Forgotten, ForgetError> {
    data.check_layout()
        .map_err(|e| ForgetError::Store(e.to_string()))?;
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match attempt(data, app, timeout, own_writer, for_bucket, &mut while_held) {
            Err(Attempt::Busy(why) | Attempt::Unreachable(why))
                if started.elapsed() < timeout.min(UNREACHABLE_WAIT) =>
            {
                log::debug!("forget {app}: {why}; trying again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
            Err(Attempt::Busy(why)) if started.elapsed() < timeout => {
                log::debug!("forget {app}: {why}; trying again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
            Err(Attempt::Busy(why) | Attempt::Unreachable(why)) => {
                return Err(ForgetError::Receivers(why))
            }
            Err(Attempt::Failed(e)) => return Err(e),
            Ok(done) => return Ok(done),
        }
    }
}

/// Why one attempt did not forget.
enum Attempt {
    /// Something was busy (another forget or reset, a writer starting): try again.
    Busy(String),
    /// A writer runs without answering on a control socket.
    Unreachable(String),
    Failed(ForgetError),
}

fn attempt(
    data: &DataDir,
    app: &AppSha,
    timeout: Duration,
    own_writer: Option<&str>,
    for_bucket: bool,
    while_held: &mut impl FnMut() -> Result<bool, String>,
) -> Result<Forgotten, Attempt> {
    // Before any receiver is held: a writer that cannot be reached fails the forget anyway
    // (for the bucket, it is left to itself).
    let mut beside = Vec::new();
    for id in writers(data)?
        .iter()
        .filter(|id| Some(id.as_str()) != own_writer)
    {
        if data.writer_running(id)
            && matches!(
                control::ping(&data.control_socket(id), timeout),
                Err(ControlError::NotRunning)
            )
        {
            if !for_bucket {
                return Err(unreachable(id));
            }
            beside.push(id.clone());
        }
    }
    let answers = control::forget_hold_all(data, app, for_bucket, timeout).map_err(|e| {
        Attempt::Failed(ForgetError::Store(format!(
            "listing the receivers of {}: {e}",
            data.root().display()
        )))
    })?;
    let mut held = Vec::new();
    let mut busy = Vec::new();
    let mut refused = Vec::new();
    let mut unsupported = Vec::new();
    for answer in answers {
        match answer.result {
            Ok(hold) => held.push((answer.writer_id, hold)),
            Err(ControlError::Refused(why)) if why.starts_with(REFUSAL_BUSY) => {
                busy.push(format!("{}: {why}", answer.writer_id))
            }
            Err(ControlError::Refused(why)) if why.starts_with(REFUSAL_UNSUPPORTED) => {
                unsupported.push(format!("receiver {}: {why}", answer.writer_id))
            }
            Err(e) => refused.push(format!("receiver {}: {e}", answer.writer_id)),
        }
    }
    // Whatever happens below, `held` ends every hold when it is dropped.
    if !unsupported.is_empty() {
        return Err(Attempt::Failed(ForgetError::Unsupported(
            unsupported.join("; "),
        )));
    }
    if !refused.is_empty() {
        return Err(Attempt::Failed(ForgetError::Receivers(format!(
            "receivers could not be held ({})",
            refused.join("; ")
        ))));
    }
    if !busy.is_empty() {
        return Err(Attempt::Busy(busy.join("; ")));
    }
    let mut done = Forgotten {
        receivers: held.iter().map(|(id, _)| id.clone()).collect(),
        ..Forgotten::default()
    };
    match while_held() {
        Ok(true) => {}
        Ok(false) => {
            release(held, timeout);
            return Ok(done);
        }
        Err(e) => return Err(Attempt::Failed(ForgetError::Store(e))),
    }
    let skip: Vec<&str> = held
        .iter()
        .map(|(id, _)| id.as_str())
        .chain(own_writer)
        .chain(beside.iter().map(String::as_str))
        .collect();
    let locks = stopped_writers_forget(data, app, &skip, &mut done)?;
    let moved = trash::move_to_trash(data, &data.app_dir(app), &format!("{TRASH_PREFIX}{app}-"))
        .map_err(|e| Attempt::Failed(ForgetError::Store(e.to_string())))?;
    release(held, timeout);
    drop(locks);
    done.found |= moved.is_some();
    done.removed = true;
    if let Some(dir) = moved {
        trash::remove(&dir);
    }
    Ok(done)
}

/// Locks every writer of `data` that is not running and not in `skip`, removes `app` from its
/// journal and its app index, and returns the locks (held until the app's directory has
/// moved). A writer that runs without being in `skip` cannot be reached.
fn stopped_writers_forget(
    data: &DataDir,
    app: &AppSha,
    skip: &[&str],
    done: &mut Forgotten,
) -> Result<Vec<WriterLock>, Attempt> {
    let failed = |e: StoreError| Attempt::Failed(ForgetError::Store(e.to_string()));
    let mut locks = Vec::new();
    for id in writers(data)?
        .iter()
        .filter(|id| !skip.contains(&id.as_str()))
    {
        if data.writer_running(id) {
            return Err(unreachable(id));
        }
        let lock = match data.lock_writer(id) {
            Ok(lock) => lock,
            Err(StoreError::WriterBusy { .. }) => {
                return Err(Attempt::Busy(format!("writer {id} is starting")));
            }
            Err(e) => return Err(failed(e)),
        };
        let dropped = journal::drop_app(&data.journal_path(id), app).map_err(|e| {
            Attempt::Failed(ForgetError::Store(format!(
                "removing the app from the journal of stopped writer {id}: {e}"
            )))
        })?;
        index::mark_unsettled(data, id, app).map_err(failed)?;
        if dropped > 0 {
            log::info!("forget {app}: removed {dropped} journaled events of stopped writer {id}");
            done.journaled += dropped;
            done.found = true;
            done.stopped_writers.push(id.clone());
        }
        locks.push(lock);
    }
    Ok(locks)
}

/// Every writer id of `data`: those under `receivers/` and those with an app index.
fn writers(data: &DataDir) -> Result<Vec<String>, Attempt> {
    let failed = |e: StoreError| Attempt::Failed(ForgetError::Store(e.to_string()));
    let mut ids = data.writer_ids().map_err(failed)?;
    ids.extend(index::indexed_writers(data).map_err(failed)?);
    ids.sort();
    ids.dedup();
    Ok(ids)
}

fn unreachable(id: &str) -> Attempt {
    Attempt::Unreachable(format!(
        "writer {id} is running but answers no control socket (an ipevent-api on the same data \
         dir: forget through its DELETE /events/<sha>)"
    ))
}

/// Ends each hold; failures are logged (closing the connection ends the hold anyway).
fn release(held: Vec<(String, Hold)>, timeout: Duration) {
    for (id, hold) in held {
        if let Err(e) = hold.end(timeout) {
            log::warn!("forget: receiver {id} did not confirm the end of its hold: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Record;
    use crate::block::AddrStats;
    use crate::journal::{Journal, MIN_JOURNAL_BYTES};
    use crate::store::{list_apps, read_app, AppendBlocks, StoreWriter};

    fn app(byte: u8) -> AppSha {
        AppSha([byte; 32])
    }

    #[test]
    fn a_stopped_writer_keeps_nothing_of_a_forgotten_app() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        // A stopped receiver: logs of two apps, and more of both still in its journal.
        let mut writer = StoreWriter::new(data.clone(), "stopped", false).unwrap();
        let one = |ip| (ip, AddrStats::one(100));
        writer.append(&app(1), 1, &[one(1), one(2)]).unwrap();
        writer.append(&app(2), 1, &[one(3)]).unwrap();
        drop(writer);
        crate::store::create_dir_all(&data.receiver_dir("stopped")).unwrap();
        let mut journal = Journal::open(&data.journal_path("stopped"), MIN_JOURNAL_BYTES).unwrap();
        journal.begin_epoch(1, false).unwrap();
        let record = |a: u8| Record {
            app: app(a),
            ip: 9,
            unix_secs: 200,
        };
        assert!(journal.append(2, &[record(1), record(2), record(1)]));
        drop(journal);
        assert_eq!(read_app(&data, &app(1)).unwrap().unwrap().count(), 4);

        let done = forget_app(&data, &app(1), Duration::from_secs(5), None, || Ok(true)).unwrap();
        assert!(done.found && done.removed);
        assert_eq!(done.journaled, 2);
        assert_eq!(done.stopped_writers, ["stopped"]);
        assert!(read_app(&data, &app(1)).unwrap().is_none());
        assert_eq!(read_app(&data, &app(2)).unwrap().unwrap().count(), 2);
        let listed: Vec<(AppSha, u64)> = list_apps(&data)
            .unwrap()
            .into_iter()
            .map(|a| (a.app, a.count))
            .collect();
        assert_eq!(listed, [(app(2), 2)]);

        // The writer starts again: nothing of the app comes back, and new events of it count.
        let mut again = StoreWriter::new(data.clone(), "stopped", false).unwrap();
        let journal = Journal::open(&data.journal_path("stopped"), MIN_JOURNAL_BYTES).unwrap();
        let mut replayed = Vec::new();
        journal
            .replay(|_, records| replayed.extend(records.iter().map(|r| r.app)))
            .unwrap();
        assert_eq!(replayed, [app(2)]);
        again.append(&app(1), 3, &[one(7)]).unwrap();
        assert_eq!(read_app(&data, &app(1)).unwrap().unwrap().count(), 1);

        let again = forget_app(&data, &app(3), Duration::from_secs(5), None, || Ok(true)).unwrap();
        assert!(!again.found, "an unknown app is found nowhere");
    }

    #[test]
    fn a_check_that_says_no_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut writer = StoreWriter::new(data.clone(), "w", false).unwrap();
        writer
            .append(&app(5), 1, &[(1, AddrStats::one(1))])
            .unwrap();
        drop(writer);
        let done = forget_app(&data, &app(5), Duration::from_secs(5), None, || Ok(false)).unwrap();
        assert!(!done.removed);
        assert_eq!(read_app(&data, &app(5)).unwrap().unwrap().count(), 1);
        assert_eq!(list_apps(&data).unwrap().len(), 1);
    }
}
