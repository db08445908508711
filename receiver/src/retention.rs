//! The retention sweep (`--retain-days N`): a thread of its own that, at start and then every
//! [`SWEEP_INTERVAL`], removes every app whose newest event is older than N days.
//!
//! It finds them with `ipevent_core::retention::expired_apps` (reading the logs, never the
//! writer's memory) and removes each through `ipevent_core::forget`, the protocol of
//! `ipevent-query forget`: every receiver on the data dir, this one included, is held for a
//! moment (flushes pause, ingest does not), and, once everything received is flushed, the app
//! is checked again, so an app that has just received an event stays. Removals are counted
//! (`apps_expired`) and logged.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ipevent_core::forget;
use ipevent_core::retention::{self, MAX_EXPIRED_PER_PASS};
use ipevent_core::{AppSha, DataDir};

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

/// Starts the sweep of `data` for apps older than `days` days. `now_unix` is the clock.
pub fn start(
    data: DataDir,
    days: u64,
    counters: Arc<Counters>,
    now_unix: fn() -> u64,
) -> std::io::Result<Retention> {
    let (stop, stopped) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || loop {
            sweep(&data, days, &counters, now_unix(), &stopped);
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
