//! Retention (`ipevent-receiver --retain-days N`): finding the apps whose newest event is older
//! than a cutoff. Removing them is [`crate::forget`]'s, the same as an operator's forget.
//!
//! An app's newest event is the highest `last_seen` over every writer's log of it (and, for
//! [`newest_event`], the journals of stopped writers): each record keeps the arrival second of
//! its address's last event, as the receiver's clock read it.

use std::path::Path;

use crate::store::walk::{for_each_app_dir, for_each_log};
use crate::store::{read_app, scan_log_file, DataDir, StoreError};
use crate::wire::AppSha;

/// Most apps one call of [`expired_apps`] returns: bounds its memory (32 bytes each) and the
/// time before the first of them is removed; the caller asks again while it gets this many.
pub const MAX_EXPIRED_PER_PASS: usize = 4096;

/// Seconds in a day, for `--retain-days`.
pub const SECS_PER_DAY: u64 = 86_400;

/// The unix second before which an app's newest event makes it expire, `days` days before
/// `now_unix` (0 when that is before 1970: nothing expires).
pub fn cutoff_unix(now_unix: u64, days: u64) -> u32 {
    let cutoff = now_unix.saturating_sub(days.saturating_mul(SECS_PER_DAY));
    u32::try_from(cutoff).unwrap_or(u32::MAX)
}

/// The apps of `data` whose logs all verify up to a record and whose newest event is before
/// `cutoff_unix`, at most `max` of them, in directory order. An app with a log that cannot
/// be read, or with no record at all, is left alone: retention never removes what it could
/// not look at.
pub fn expired_apps(
    data: &DataDir,
    cutoff_unix: u32,
    max: usize,
) -> Result<Vec<AppSha>, StoreError> {
    data.check_layout()?;
    let mut out = Vec::new();
    for_each_app_dir(data, |entry| {
        if out.len() >= max {
            return Ok(());
        }
        let Some(app) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<AppSha>().ok())
        else {
            return Ok(());
        };
        match newest_in_logs(&entry.path()) {
            Ok(Some(newest)) if newest < cutoff_unix => out.push(app),
            Ok(_) => {}
            Err(e) => log::warn!("retention: leaving app {app} alone: {e}"),
        }
        Ok(())
    })?;
    Ok(out)
}

/// The newest `last_seen` over the logs in the app directory `dir` (`None`: no record).
fn newest_in_logs(dir: &Path) -> Result<Option<u32>, StoreError> {
    if !crate::store::plain_dir(dir)? {
        return Ok(None);
    }
    let mut newest: Option<u32> = None;
    for_each_log(dir, |path| {
        scan_log_file(&path, |_, stats| {
            newest = Some(newest.map_or(stats.last_seen, |n| n.max(stats.last_seen)));
        })?;
        Ok(())
    })?;
    Ok(newest)
}

/// The newest event of `app` the store holds, as every reader sees it (all logs, and the
/// journals of stopped writers); `None` when the store has none.
pub fn newest_event(data: &DataDir, app: &AppSha) -> Result<Option<u32>, StoreError> {
    Ok(read_app(data, app)?.and_then(|d| d.addrs.iter().map(|(_, s)| s.last_seen).max()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::AddrStats;
    use crate::store::{AppendBlocks, StoreWriter};

    #[test]
    fn only_apps_whose_newest_event_is_old_expire() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut a = StoreWriter::new(data.clone(), "a", false).unwrap();
        let mut b = StoreWriter::new(data.clone(), "b", false).unwrap();
        let seen = |first, last| AddrStats {
            count: 1,
            first_seen: first,
            last_seen: last,
        };
        let (old, mixed, fresh) = (AppSha([1; 32]), AppSha([2; 32]), AppSha([3; 32]));
        a.append(&old, 1, &[(1, seen(10, 50)), (2, seen(10, 90))])
            .unwrap();
        // Old in one writer's log, recent in the other's: the newest event counts.
        a.append(&mixed, 1, &[(1, seen(10, 20))]).unwrap();
        b.append(&mixed, 1, &[(1, seen(10, 500))]).unwrap();
        b.append(&fresh, 1, &[(3, seen(400, 1000))]).unwrap();
        assert_eq!(expired_apps(&data, 100, 10).unwrap(), [old]);
        assert_eq!(expired_apps(&data, 90, 10).unwrap(), Vec::<AppSha>::new());
        let mut all = expired_apps(&data, 2000, 10).unwrap();
        all.sort();
        assert_eq!(all, [old, mixed, fresh]);
        assert_eq!(expired_apps(&data, 2000, 2).unwrap().len(), 2);
        assert_eq!(newest_event(&data, &mixed).unwrap(), Some(500));
        assert_eq!(newest_event(&data, &AppSha([9; 32])).unwrap(), None);
    }

    #[test]
    fn the_cutoff_is_days_before_now() {
        assert_eq!(
            cutoff_unix(10 * SECS_PER_DAY + 5, 3),
            (7 * SECS_PER_DAY + 5) as u32
        );
        assert_eq!(cutoff_unix(5, 3), 0);
        assert_eq!(cutoff_unix(u64::MAX, 1), u32::MAX);
    }
}
