//! The one store reader: maps every writer's log of an app, verifies each block and merges
//! what verifies; lists every app with its count.

use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};

use super::backend::{AppCount, AppData, EachApp, Store};
use super::fsio::{plain_dir, StoreError};
use super::layout::DataDir;
use super::walk::{for_each_app_dir, for_each_log, scan_log_file};
use crate::block::{AddrStats, Tail};
use crate::journal::for_each_stopped_record;
use crate::lookup::Cidr;
use crate::wire::AppSha;

/// Reads and merges every log of `app`. `Ok(None)` when the store has never seen the app.
/// An app directory (or its fan-out directory) that is a symlink is refused, as writers
/// refuse it; a log that cannot be read is listed in [`AppData::unreadable`] and the others
/// are counted.
///
/// Events still in the journal of a writer that is not running are counted too (see
/// [`for_each_stopped_record`]), so a query never under-reports while a receiver is
/// down, and never counts an event twice. To read many apps, [`Snapshot`] reads those
/// journals once for all of them.
pub fn read_app(data: &DataDir, app: &AppSha) -> Result<Option<AppData>, StoreError> {
    data.check_layout()?;
    read_app_with(data, app, |each| {
        for_each_stopped_record(data, |writer, epoch, record| {
            if record.app == *app {
                each(writer, epoch, record.ip, record.unix_secs);
            }
        })
    })
}

/// What the journals of stopped writers held when it was read: one read of them for a
/// batch of [`Snapshot::read_app`]s, instead of one per app (a lock probe and a read of
/// each journal).
#[derive(Debug, Default)]
pub struct StoppedJournals {
    writers: Vec<String>,
    /// Per app: (writer, epoch, ip, arrival) of each journaled record, in journal order.
    by_app: FxHashMap<AppSha, Vec<(u32, u64, u32, u32)>>,
}

impl StoppedJournals {
    /// Reads every stopped writer's journal once (see [`for_each_stopped_record`]).
    pub fn read(data: &DataDir) -> StoppedJournals {
        let mut journals = StoppedJournals::default();
        for_each_stopped_record(data, |writer, epoch, record| {
            if journals.writers.last().map(String::as_str) != Some(writer) {
                journals.writers.push(writer.to_string());
            }
            let w = (journals.writers.len() - 1) as u32;
            journals.by_app.entry(record.app).or_default().push((
                w,
                epoch,
                record.ip,
                record.unix_secs,
            ));
        });
        journals
    }

    /// The apps with a journaled record whose address `matches`.
    pub fn apps_with(&self, mut matches: impl FnMut(u32) -> bool) -> Vec<AppSha> {
        self.by_app
            .iter()
            .filter(|(_, records)| records.iter().any(|r| matches(r.2)))
            .map(|(app, _)| *app)
            .collect()
    }

    fn for_app(&self, app: &AppSha, each: &mut dyn FnMut(&str, u64, u32, u32)) {
        for &(w, epoch, ip, secs) in self.by_app.get(app).into_iter().flatten() {
            each(&self.writers[w as usize], epoch, ip, secs);
        }
    }
}

/// The one store reader for a batch of apps: the layout checked and the stopped writers'
/// journals read once ([`StoppedJournals`]), then each app read as [`read_app`] reads it.
/// A journal record is counted exactly as [`read_app`] counts it: once, when its epoch is
/// above what its writer's log of the app held when read.
#[derive(Debug)]
pub struct Snapshot<'a> {
    data: &'a DataDir,
    journals: StoppedJournals,
}

impl<'a> Snapshot<'a> {
    /// Checks the layout and reads the stopped writers' journals.
    pub fn new(data: &'a DataDir) -> Result<Snapshot<'a>, StoreError> {
        data.check_layout()?;
        Ok(Snapshot {
            data,
            journals: StoppedJournals::read(data),
        })
    }

    /// [`read_app`], with the journals as this snapshot read them.
    pub fn read_app(&self, app: &AppSha) -> Result<Option<AppData>, StoreError> {
        read_app_with(self.data, app, |each| self.journals.for_app(app, each))
    }

    /// What the stopped writers' journals held.
    pub fn journals(&self) -> &StoppedJournals {
        &self.journals
    }
}

/// [`read_app`] with the app's journaled records (writer, epoch, ip, arrival) from
/// `journaled`, which the caller calls after the logs are read.
fn read_app_with(
    data: &DataDir,
    app: &AppSha,
    journaled: impl FnOnce(&mut dyn FnMut(&str, u64, u32, u32)),
) -> Result<Option<AppData>, StoreError> {
    let dir = data.app_dir(app);
    let fan = dir.parent().expect("an app dir has a parent");
    let has_dir = plain_dir(fan)? && plain_dir(&dir)?;
    let mut merged: FxHashMap<u32, AddrStats> = FxHashMap::default();
    let mut out = AppData::default();
    // Per writer, the highest epoch its log of this app holds, as read.
    let mut log_epochs: FxHashMap<String, u64> = FxHashMap::default();
    let logs = |path: PathBuf| {
        let scanned = scan_log_file(&path, |ip, stats| {
            merged.entry(ip).or_default().merge(&stats);
        });
        let summary = match scanned {
            Ok(Some(summary)) => summary,
            Ok(None) => return Ok(()),
            Err(e) => {
                out.unreadable.push((path, e.to_string()));
                return Ok(());
            }
        };
        out.logs += 1;
        out.blocks += summary.blocks;
        if let Some(writer) = writer_of_log(&path) {
            log_epochs.insert(writer, summary.max_epoch);
        }
        if let Tail::Torn { offset, .. } = summary.tail {
            out.torn.push((path, offset));
        }
        Ok(())
    };
    if has_dir {
        for_each_log(&dir, logs)?;
    }
    // After the logs: a record read here with an epoch above what its writer's log held when
    // read is in no block read above, whatever that writer did in between.
    journaled(&mut |writer, epoch, ip, unix_secs| {
        if epoch > log_epochs.get(writer).copied().unwrap_or(0) {
            merged
                .entry(ip)
                .or_default()
                .merge(&AddrStats::one(unix_secs));
            out.journaled += 1;
        }
    });
    if out.logs == 0 && out.journaled == 0 {
        if let Some((path, why)) = out.unreadable.first() {
            // Nothing to count, and something the operator must see: not "no events".
            return Err(StoreError::Io {
                action: "reading",
                path: path.clone(),
                source: std::io::Error::other(why.clone()),
            });
        }
        return Ok(None);
    }
    out.addrs = merged.into_iter().collect();
    out.addrs.sort_unstable_by_key(|(ip, _)| *ip);
    Ok(Some(out))
}

/// The writer id a log belongs to: its file name without `.log`.
fn writer_of_log(path: &Path) -> Option<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
}

/// Every app in the store with its count, most events first (ties by SHA). One app that
/// cannot be read is listed with why ([`AppCount::unreadable`]) and never hides the others.
///
/// Events still in the journals of writers that are not running are counted too, as
/// [`read_app`] counts them.
pub fn list_apps(data: &DataDir) -> Result<Vec<AppCount>, StoreError> {
    data.check_layout()?;
    let mut tails = JournalTails::read(data);
    if let Some(mut out) = super::index::list_from_indexes(data)? {
        tails.add_to(data, &mut out);
        out.sort_unstable_by(|a, b| b.count.cmp(&a.count).then(a.app.cmp(&b.app)));
        return Ok(out);
    }
    let mut out = Vec::new();
    for_each_app_dir(data, |app_entry| {
        let Some(app) = app_entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<AppSha>().ok())
        else {
            return Ok(());
        };
        let mut entry = AppCount::new(app, 0);
        let mut logs = 0;
        let mut log_epochs: FxHashMap<String, u64> = FxHashMap::default();
        let dir = app_entry.path();
        let listed = plain_dir(&dir).and_then(|_| {
            for_each_log(&dir, |log| {
                match scan_log_file(&log, |_, _| {}) {
                    Ok(Some(summary)) => {
                        entry.count += summary.events;
                        logs += 1;
                        if let Some(writer) = writer_of_log(&log) {
                            log_epochs.insert(writer, summary.max_epoch);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => entry.unreadable = Some(e.to_string()),
                }
                Ok(())
            })
        });
        if let Err(e) = listed {
            entry.unreadable = Some(e.to_string());
        }
        let journaled = tails.take(&app, &log_epochs);
        entry.count += journaled;
        if logs > 0 || journaled > 0 || entry.unreadable.is_some() {
            out.push(entry);
        }
        Ok(())
    })?;
    // Apps that so far exist only in a stopped writer's journal.
    let no_logs = FxHashMap::default();
    for app in tails.apps() {
        let count = tails.take(&app, &no_logs);
        if count > 0 {
            out.push(AppCount::new(app, count));
        }
    }
    out.sort_unstable_by(|a, b| b.count.cmp(&a.count).then(a.app.cmp(&b.app)));
    Ok(out)
}

/// The highest epoch among the verified blocks of `writer_id`'s logs (0 when it has none). A
/// log that cannot be read is skipped with a warning: it holds no block a writer could use.
pub fn max_epoch_of_writer(data: &DataDir, writer_id: &str) -> Result<u64, StoreError> {
    let name = format!("{writer_id}.log");
    let mut max_epoch = 0;
    for_each_app_dir(data, |app_entry| {
        match scan_log_file(&app_entry.path().join(&name), |_, _| {}) {
            Ok(Some(summary)) => max_epoch = max_epoch.max(summary.max_epoch),
            Ok(None) => {}
            Err(e) => log::warn!("{e}"),
        }
        Ok(())
    })?;
    Ok(max_epoch)
}

/// Event counts of stopped writers' journals, per app, writer and epoch.
struct JournalTails {
    writers: Vec<String>,
    by_app: FxHashMap<AppSha, Vec<(usize, u64, u64)>>,
}

impl JournalTails {
    fn read(data: &DataDir) -> JournalTails {
        let mut tails = JournalTails {
            writers: Vec::new(),
            by_app: FxHashMap::default(),
        };
        for_each_stopped_record(data, |writer, epoch, record| {
            if tails.writers.last().map(String::as_str) != Some(writer) {
                tails.writers.push(writer.to_string());
            }
            let w = tails.writers.len() - 1;
            let counts = tails.by_app.entry(record.app).or_default();
            match counts.last_mut() {
                Some((lw, le, n)) if *lw == w && *le == epoch => *n += 1,
                _ => counts.push((w, epoch, 1)),
            }
        });
        tails
    }

    /// The events of `app` above the epoch each writer's log holds, once: they are forgotten.
    fn take(&mut self, app: &AppSha, log_epochs: &FxHashMap<String, u64>) -> u64 {
        let Some(counts) = self.by_app.remove(app) else {
            return 0;
        };
        counts
            .into_iter()
            .filter(|(w, epoch, _)| {
                *epoch > log_epochs.get(&self.writers[*w]).copied().unwrap_or(0)
            })
            .map(|(_, _, n)| n)
            .sum()
    }

    fn apps(&self) -> Vec<AppSha> {
        self.by_app.keys().copied().collect()
    }

    /// Adds the journaled events to `out` (counts from the app indexes): for each app in a
    /// journal, the epochs its writers' logs hold decide what is not in them yet.
    fn add_to(&mut self, data: &DataDir, out: &mut Vec<AppCount>) {
        if self.by_app.is_empty() {
            return;
        }
        let mut at: FxHashMap<AppSha, usize> = FxHashMap::default();
        for (i, entry) in out.iter().enumerate() {
            at.insert(entry.app, i);
        }
        for app in self.apps() {
            let mut log_epochs: FxHashMap<String, u64> = FxHashMap::default();
            let readable = plain_dir(&data.app_dir(&app)).unwrap_or(false);
            for writer in self.writers.iter().filter(|_| readable) {
                if let Ok(Some(summary)) = scan_log_file(&data.log_path(&app, writer), |_, _| {}) {
                    log_epochs.insert(writer.clone(), summary.max_epoch);
                }
            }
            let journaled = self.take(&app, &log_epochs);
            if journaled == 0 {
                continue;
            }
            match at.get(&app) {
                Some(&i) => out[i].count += journaled,
                None => out.push(AppCount::new(app, journaled)),
            }
        }
    }
}

impl Store for DataDir {
    fn read_app(&self, app: &AppSha) -> Result<Option<AppData>, StoreError> {
        read_app(self, app)
    }

    fn list_apps(&self) -> Result<Vec<AppCount>, StoreError> {
        list_apps(self)
    }

    /// Reads the stopped writers' journals once for all of `apps`.
    fn read_apps(&self, apps: &[AppSha], each: &mut EachApp<'_>) -> Result<(), StoreError> {
        let snapshot = Snapshot::new(self)?;
        for app in apps {
            each(app, snapshot.read_app(app));
        }
        Ok(())
    }

    fn apps_with_address(&self, cidr: Cidr) -> Result<Option<Vec<AppSha>>, StoreError> {
        super::addr_index::candidates(self, cidr)
    }

    fn follow_changes(&self) -> Result<Box<dyn super::backend::ChangeFeed>, StoreError> {
        Ok(Box::new(super::changes::IndexFeed::start(self)?))
    }
}
