//! The retention sweep (`--retain-days N`): a thread of its own that, at start and then every
//! [`SWEEP_INTERVAL`], removes every app whose newest event is older than N days.
//!
//! It finds them with `ipevent_core::retention::expired_apps` (reading the logs, never the
//! writer's memory) and removes each through `ipevent_core::forget`, the protocol of
//! `ipevent-query forget`: every receiver on the data dir, this one included, is held for a
//! moment (flushes pause, ingest does not), and, once everything received is flushed, the app
//! is checked again, so an app that has just received an event stays. Removals are counted
//! (`apps_expired`) and logged.
//!
//! With `--store`, the sweep judges the bucket instead: an app's newest event over every
//! writer's database (`Bucket::expired_apps`), checked again for each app once every receiver
//! has answered a sync of the cluster, and removed through the forget of the bucket
//! (`Bucket::forget_apps`, up to `MAX_APPS_PER_FORGET` apps a forget), which every writer of
//! the bucket applies, this receiver included.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ipevent_core::forget;
use ipevent_core::retention::{self, MAX_EXPIRED_PER_PASS};
use ipevent_core::{AppSha, DataDir};
use ipevent_store_s3::{Bucket, MAX_APPS_PER_FORGET};

use crate::counters::Counters;

/// How often the store is swept after the first sweep at start. Retention counts in days, so
/// an hour late is nothing, and a sweep reads every log's records.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// How long one removal waits for the receivers (this one may still be replaying its journal
/// at start) before the sweep gives up until the next one.
const FORGET_TIMEOUT: Duration = Duration::from_secs(60);

/// The running sweep; dropping it stops it at the next app.
pub struct Retention {
    _stop: Sender<()>,
}

/// Starts the sweep of `data` (or of `bucket`, with `--store`) for apps older than `days`
/// days. `now_unix` is the clock.
pub fn start(
    data: DataDir,
    bucket: Option<Arc<Bucket>>,
    days: u64,
    counters: Arc<Counters>,
    now_unix: fn() -> u64,
) -> std::io::Result<Retention> {
    let (stop, stopped) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || loop {
            match &bucket {
                Some(bucket) => sweep_bucket(bucket, days, &counters, now_unix(), &stopped),
                None => sweep(&data, days, &counters, now_unix(), &stopped),
            }
            match stopped.recv_timeout(SWEEP_INTERVAL) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        })?;
    log::info!("retention: apps whose newest event is older than {days} days are removed");
    Ok(Retention { _stop: stop })
}

/// One sweep: removes every app older than the cutoff, a bounded batch at a time.
fn sweep(data: &DataDir, days: u64, counters: &Counters, now_unix: u64, stopped: &Receiver<()>) {
    let cutoff = retention::cutoff_unix(now_unix, days);
    let mut removed = 0u64;
    loop {
        let apps = match retention::expired_apps(data, cutoff, MAX_EXPIRED_PER_PASS) {
            Ok(apps) => apps,
            Err(e) => {
                log::warn!("retention: listing the apps: {e}; trying again at the next sweep");
                break;
            }
        };
        for app in &apps {
            if !matches!(
                stopped.try_recv(),
                Err(crossbeam_channel::TryRecvError::Empty)
            ) {
                return;
            }
            match remove(data, app, cutoff) {
                Ok(true) => {
                    removed += 1;
                    counters.apps_expired.fetch_add(1, Relaxed);
                    log::info!(
                        "retention: removed app {app}: its newest event is older than {days} days"
                    );
                }
                Ok(false) => {}
                Err(e) => {
                    log::warn!("retention: app {app}: {e}; trying again at the next sweep");
                    return;
                }
            }
        }
        if apps.len() < MAX_EXPIRED_PER_PASS {
            break;
        }
    }
    if removed > 0 {
        log::info!("retention: sweep removed {removed} apps older than {days} days");
    }
}

/// Removes `app` unless, once every receiver has flushed, its newest event is no longer
/// before `cutoff`. True when it was removed.
fn remove(data: &DataDir, app: &AppSha, cutoff: u32) -> Result<bool, forget::ForgetError> {
    let still_old = || {
        retention::newest_event(data, app)
            .map(|newest| newest.is_some_and(|n| n < cutoff))
            .map_err(|e| e.to_string())
    };
    Ok(forget::forget_app(data, app, FORGET_TIMEOUT, None, still_old)?.removed)
}

/// One sweep of the bucket: removes every app whose newest event, over every writer's
/// database, is older than the cutoff, a bounded batch at a time.
fn sweep_bucket(
    bucket: &Arc<Bucket>,
    days: u64,
    counters: &Counters,
    now_unix: u64,
    stopped: &Receiver<()>,
) {
    let cutoff = retention::cutoff_unix(now_unix, days);
    let mut removed = 0u64;
    loop {
        let apps = match bucket.expired_apps(cutoff, MAX_EXPIRED_PER_PASS) {
            Ok(apps) => apps,
            Err(e) => {
                log::warn!(
                    "retention: listing the bucket's apps: {e}; trying again at the next sweep"
                );
                break;
            }
        };
        if apps.is_empty() {
            break;
        }
        // What the receivers hold but have not shipped yet counts too: each app is checked
        // again once every receiver has shipped what it had.
        match bucket.sync_all(FORGET_TIMEOUT) {
            Ok(synced) if synced.missing.is_empty() => {}
            Ok(synced) => {
                log::warn!(
                    "retention: receivers {} did not answer a sync of the cluster; trying again \
                     at the next sweep",
                    synced.missing.join(", ")
                );
                break;
            }
            Err(e) => {
                log::warn!("retention: syncing the cluster: {e}; trying again at the next sweep");
                break;
            }
        }
        if !matches!(
            stopped.try_recv(),
            Err(crossbeam_channel::TryRecvError::Empty)
        ) {
            return;
        }
        let still_old = match still_old(bucket, &apps, cutoff) {
            Ok(old) => old,
            Err(e) => {
                log::warn!("retention: reading the bucket: {e}; trying again at the next sweep");
                break;
            }
        };
        for batch in still_old.chunks(MAX_APPS_PER_FORGET) {
            match bucket.forget_apps(batch, FORGET_TIMEOUT) {
                Ok(done) if done.complete() => {
                    removed += batch.len() as u64;
                    counters.apps_expired.fetch_add(batch.len() as u64, Relaxed);
                    for app in batch {
                        log::info!(
                            "retention: removed app {app} from the bucket: its newest event is \
                             older than {days} days"
                        );
                    }
                }
                Ok(done) => {
                    log::warn!(
                        "retention: receivers {} did not apply the removal of {} apps yet (they \
                         do when they next look); trying again at the next sweep",
                        done.missing.join(", "),
                        batch.len()
                    );
                    return;
                }
                Err(e) => {
                    log::warn!(
                        "retention: removing {} apps: {e}; trying again at the next sweep",
                        batch.len()
                    );
                    return;
                }
            }
        }
        // Apps that turned out recent are listed again by the next pass: stop at a pass that
        // removed none.
        if apps.len() < MAX_EXPIRED_PER_PASS || still_old.is_empty() {
            break;
        }
    }
    if removed > 0 {
        log::info!(
            "retention: sweep removed {removed} apps older than {days} days from the bucket"
        );
    }
}

/// Those of `apps` whose newest event, read again over every writer, is still before
/// `cutoff`.
fn still_old(bucket: &Bucket, apps: &[AppSha], cutoff: u32) -> Result<Vec<AppSha>, String> {
    let mut old = Vec::new();
    let mut failed = None;
    bucket
        .read_apps(apps, &mut |app, read| match read {
            Ok(data) => {
                let newest = data.and_then(|d| d.addrs.iter().map(|(_, s)| s.last_seen).max());
                if newest.is_some_and(|n| n < cutoff) {
                    old.push(*app);
                }
            }
            Err(e) => failed = Some(e.to_string()),
        })
        .map_err(|e| e.to_string())?;
    match failed {
        Some(e) => Err(e),
        None => Ok(old),
    }
}
