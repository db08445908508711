//! A writer's limits: on creating directories for new apps (how many apps, free bytes and
//! inodes), so a flood of new SHAs cannot fill the disk, and on the distinct addresses it
//! stores per app.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::compact;
use super::fsio::{
    io_err, map_read, open_dir, StoreError, DIR_MODE, REFUSED_APP_LIMIT, REFUSED_LOW_DISK,
};
use super::layout::DataDir;
use super::log_state::LogState;
use super::walk::count_app_dirs;
use crate::block::AddrStats;
use crate::wire::AppSha;

/// How often the writer looks at free space while it creates app directories.
const FREE_SPACE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Limits on creating directories for new apps, so a flood of new SHAs cannot fill the disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreLimits {
    /// Most apps the store may hold (all writers); `None`: no limit.
    pub max_apps: Option<u64>,
    /// No new app below this many free bytes.
    pub min_free_bytes: u64,
    /// No new app below this many free inodes.
    pub min_free_inodes: u64,
    /// Most distinct addresses this writer stores for one app; events of further new
    /// addresses are refused ([`REFUSED_ADDRESS_LIMIT`]). `None`: no limit.
    pub max_addresses_per_app: Option<u64>,
}

/// Reason of events refused by [`StoreLimits::max_addresses_per_app`].
pub const REFUSED_ADDRESS_LIMIT: &str = "address_limit";

/// The app directories a writer makes, within its [`StoreLimits`].
#[derive(Debug)]
pub(super) struct AppDirs {
    /// Fan-out directories (by first SHA byte) known to be plain directories.
    fans_ready: [bool; 256],
    /// Fan-out directories open for [`super::create::create_logs`] during one flush, so
    /// that a new app's `mkdir` and `open` walk one component instead of the whole path.
    fan_files: Vec<Option<File>>,
    pub(super) limits: StoreLimits,
    /// Apps in the store, counted when a `max_apps` limit is set.
    apps: u64,
    /// When free space was last looked at, and whether it was below the thresholds.
    free_checked: Option<(Instant, bool)>,
}

impl Default for AppDirs {
    fn default() -> AppDirs {
        AppDirs {
            fans_ready: [false; 256],
            fan_files: Vec::new(),
            limits: StoreLimits::default(),
            apps: 0,
            free_checked: None,
        }
    }
}

impl AppDirs {
    /// One app directory fewer in the store (an app forgotten).
    pub(super) fn removed_one(&mut self) {
        self.apps = self.apps.saturating_sub(1);
    }

    /// Sets the limits on new apps; with a `max_apps` limit, counts the apps already stored.
    pub(super) fn set_limits(
        &mut self,
        data: &DataDir,
        limits: StoreLimits,
    ) -> Result<(), StoreError> {
        self.limits = limits;
        if limits.max_apps.is_some() {
            self.apps = count_app_dirs(data)?;
        }
        Ok(())
    }

    /// Forgets which fan-out directories exist (after a reset moved the tree away).
    pub(super) fn forget(&mut self) {
        self.fans_ready = [false; 256];
        self.close_fans();
    }

    /// Closes the fan-out directories [`AppDirs::may_create`] opened (at the end of a flush).
    pub(super) fn close_fans(&mut self) {
        self.fan_files = Vec::new();
    }

    /// The open fan-out directory of `app`, if [`AppDirs::may_create`] opened it.
    pub(super) fn fan(&self, app: &AppSha) -> Option<&File> {
        self.fan_files.get(usize::from(app.0[0]))?.as_ref()
    }

    /// Makes sure `app`'s directory exists as a plain directory, creating it (within the
    /// limits) when it does not. True when it was created now: the app is new to the store.
    ///
    /// A new app costs one `mkdir`: the fan-out directory is checked once per process, and a
    /// directory `mkdir` just made is a plain one.
    pub(super) fn ensure_app_dir(
        &mut self,
        data: &DataDir,
        app: &AppSha,
    ) -> Result<bool, StoreError> {
        let dir = data.app_dir(app);
        let allowed = self.check_limits(data, app);
        if allowed.is_ok() {
            self.ensure_fan(data, app)?;
            match fs::DirBuilder::new().mode(DIR_MODE).create(&dir) {
                Ok(()) => {
                    self.apps += 1;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("creating directory", &dir)(e)),
            }
        }
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {
                self.ensure_fan(data, app)?;
                Ok(false)
            }
            Ok(_) => Err(StoreError::NotADirectory(dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                allowed.and(Err(io_err("inspecting", &dir)(e)))
            }
            Err(e) => Err(io_err("inspecting", &dir)(e)),
        }
    }

    /// Whether `app`'s directory may be made by [`super::create::create_logs`]: its fan-out
    /// directory is ready, open ([`AppDirs::fan`]) until [`AppDirs::close_fans`], and no
    /// limit stands in the way. Never with a `max_apps` limit (which counts apps one by one),
    /// and never a refusal: a refused app takes [`AppDirs::ensure_app_dir`], which reports it.
    pub(super) fn may_create(&mut self, data: &DataDir, app: &AppSha) -> Result<bool, StoreError> {
        if self.limits.max_apps.is_some() || self.check_limits(data, app).is_err() {
            return Ok(false);
        }
        self.ensure_fan(data, app)?;
        let slot = usize::from(app.0[0]);
        if self.fan_files.is_empty() {
            self.fan_files.resize_with(256, || None);
        }
        if self.fan_files[slot].is_none() {
            let fan = data.app_dir(app);
            let fan = fan.parent().expect("an app dir has a parent");
            self.fan_files[slot] = Some(open_dir(fan)?);
        }
        Ok(true)
    }

    /// Makes sure the fan-out directory of `app` is a plain directory.
    fn ensure_fan(&mut self, data: &DataDir, app: &AppSha) -> Result<(), StoreError> {
        let slot = usize::from(app.0[0]);
        if self.fans_ready[slot] {
            return Ok(());
        }
        let dir = data.app_dir(app);
        let fan = dir.parent().expect("an app dir has a parent");
        match fs::DirBuilder::new().mode(DIR_MODE).create(fan) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating directory", fan)(e)),
        }
        // `mkdir` never follows a link, but a link planted there would be passed through.
        let meta = fs::symlink_metadata(fan).map_err(io_err("inspecting", fan))?;
        if !meta.is_dir() {
            return Err(StoreError::NotADirectory(fan.to_path_buf()));
        }
        self.fans_ready[slot] = true;
        Ok(())
    }

    /// Whether a new app may be created now: refused past `max_apps`, or while free space is
    /// below the thresholds (looked at most once per [`FREE_SPACE_CHECK_INTERVAL`]).
    fn check_limits(&mut self, data: &DataDir, app: &AppSha) -> Result<(), StoreError> {
        if self.limits.max_apps.is_some_and(|max| self.apps >= max) {
            return Err(StoreError::Refused {
                app: *app,
                reason: REFUSED_APP_LIMIT,
            });
        }
        if self.limits.min_free_bytes == 0 && self.limits.min_free_inodes == 0 {
            return Ok(());
        }
        let low = match self.free_checked {
            Some((at, low)) if at.elapsed() < FREE_SPACE_CHECK_INTERVAL => low,
            _ => {
                let events = data.events_dir();
                let (bytes, inodes) = crate::sys::free_space(&events)
                    .map_err(io_err("measuring free space of", &events))?;
                let low =
                    bytes < self.limits.min_free_bytes || inodes < self.limits.min_free_inodes;
                self.free_checked = Some((Instant::now(), low));
                low
            }
        };
        if low {
            return Err(StoreError::Refused {
                app: *app,
                reason: REFUSED_LOW_DISK,
            });
        }
        Ok(())
    }
}

/// Applies `max_addresses_per_app` (`max`) to `records` bound for the log at `path`:
/// addresses the log holds always go in, new ones (lowest first) while the log has fewer
/// distinct addresses than the limit. Fills `admitted` and returns the events refused.
/// `state.distinct` stays exact once the log is near the limit, and an upper bound below it.
pub(super) fn admit(
    path: &Path,
    state: &mut LogState,
    records: &[(u32, AddrStats)],
    max: u64,
    admitted: &mut Vec<(u32, AddrStats)>,
) -> Result<u64, StoreError> {
    admitted.clear();
    let offered = records.len() as u64;
    if state.distinct + offered <= max {
        state.distinct += offered;
        state.distinct_exact = state.distinct_exact && state.is_new;
        admitted.extend_from_slice(records);
        return Ok(0);
    }
    let map = map_read(path)?;
    let log = map.as_ref().map_or(&[][..], |m| m.as_ref());
    if !state.distinct_exact {
        state.distinct = compact::merge(log, &[], |_, _| Ok::<(), ()>(())).unwrap_or(0);
        state.distinct_exact = true;
    }
    let ips: Vec<u32> = records.iter().map(|(ip, _)| *ip).collect();
    let mut known = vec![false; ips.len()];
    compact::mark_known(log, &ips, &mut known);
    let mut refused = 0;
    for (record, known) in records.iter().zip(known) {
        if known {
            admitted.push(*record);
        } else if state.distinct < max {
            state.distinct += 1;
            admitted.push(*record);
        } else {
            refused += record.1.count;
        }
    }
    Ok(refused)
}
