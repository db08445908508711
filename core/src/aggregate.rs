//! Folding accepted events into per-app, per-address counts between flushes.
//!
//! One flat table keyed by (app index, address) holds the counts, and a second maps each app
//! to its index: 24 bytes per (app, address) pair and 36 per app, whatever the number of apps,
//! where a map per app would cost a table header and allocation each.

use rustc_hash::FxHashMap;

use crate::block::AddrStats;
use crate::wire::AppSha;

/// A validated event with its arrival second: what ingest hands to the writer (40 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The app.
    pub app: AppSha,
    /// The IPv4 address, host order.
    pub ip: u32,
    /// Arrival, unix seconds.
    pub unix_secs: u32,
}

/// Bytes of one app slot in the app table.
pub const APP_SLOT_BYTES: usize = std::mem::size_of::<(AppSha, u32)>();
/// Bytes of one (app, address) slot in the address table.
pub const ENTRY_SLOT_BYTES: usize = std::mem::size_of::<(u64, AddrStats)>();

/// The key of an (app, address) pair: app index above, address below.
#[inline]
fn key(app_index: u32, ip: u32) -> u64 {
    (u64::from(app_index) << 32) | u64::from(ip)
}

/// Events waiting for the next flush: app -> address -> (count, first, last).
#[derive(Default, Debug)]
pub struct Pending {
    index: FxHashMap<AppSha, u32>,
    apps: Vec<AppSha>,
    addrs: FxHashMap<u64, AddrStats>,
    events: u64,
}

impl Pending {
    /// Folds `records` in.
    pub fn add(&mut self, records: &[Record]) {
        for r in records {
            self.add_stats(&r.app, r.ip, &AddrStats::one(r.unix_secs));
        }
    }

    /// Folds in `stats` for one address of `app`.
    #[inline]
    pub fn add_stats(&mut self, app: &AppSha, ip: u32, stats: &AddrStats) {
        let next = self.apps.len() as u32;
        let index = *self.index.entry(*app).or_insert(next);
        if index == next {
            self.apps.push(*app);
        }
        self.addrs.entry(key(index, ip)).or_default().merge(stats);
        self.events += stats.count;
    }

    /// Distinct (app, address) pairs held: what bounds memory.
    pub fn entries(&self) -> usize {
        self.addrs.len()
    }

    /// Events held.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Apps held.
    pub fn apps(&self) -> usize {
        self.apps.len()
    }

    /// The apps held, in the order they arrived.
    pub fn app_list(&self) -> &[AppSha] {
        &self.apps
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// Takes everything out, grouped by app and sorted by address, leaving this empty.
    ///
    /// The app map goes first: its memory is free again before the sorted copy of the
    /// addresses is made, which would otherwise be the receiver's peak.
    pub fn take(&mut self) -> Drained {
        self.index = FxHashMap::default();
        let mut entries: Vec<(u64, AddrStats)> =
            std::mem::take(&mut self.addrs).into_iter().collect();
        entries.sort_unstable_by_key(|(k, _)| *k);
        self.events = 0;
        Drained {
            apps: std::mem::take(&mut self.apps),
            entries,
        }
    }
}

/// What [`Pending::take`] took: every app's addresses, sorted.
#[derive(Debug, Default)]
pub struct Drained {
    apps: Vec<AppSha>,
    entries: Vec<(u64, AddrStats)>,
}

impl Drained {
    /// Apps in it.
    pub fn apps(&self) -> usize {
        self.apps.len()
    }

    /// Each app with its addresses, ascending; `out` is cleared and filled for each call of `f`.
    pub fn for_each_app(
        &self,
        out: &mut Vec<(u32, AddrStats)>,
        mut f: impl FnMut(&AppSha, &[(u32, AddrStats)]),
    ) {
        for group in self.entries.chunk_by(|a, b| a.0 >> 32 == b.0 >> 32) {
            out.clear();
            out.extend(group.iter().map(|(k, s)| (*k as u32, *s)));
            f(&self.apps[(group[0].0 >> 32) as usize], out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_counts_and_times_and_groups_by_app() {
        let a = AppSha([1; 32]);
        let b = AppSha([2; 32]);
        let mut pending = Pending::default();
        pending.add(&[
            Record {
                app: a,
                ip: 5,
                unix_secs: 20,
            },
            Record {
                app: b,
                ip: 9,
                unix_secs: 1,
            },
            Record {
                app: a,
                ip: 5,
                unix_secs: 10,
            },
            Record {
                app: a,
                ip: 3,
                unix_secs: 30,
            },
        ]);
        assert_eq!(
            (pending.entries(), pending.events(), pending.apps()),
            (3, 4, 2)
        );
        let drained = pending.take();
        assert!(pending.is_empty());
        assert_eq!(drained.apps(), 2);
        let mut seen = Vec::new();
        drained.for_each_app(&mut Vec::new(), |app, addrs| {
            seen.push((*app, addrs.to_vec()))
        });
        let five = AddrStats {
            count: 2,
            first_seen: 10,
            last_seen: 20,
        };
        assert_eq!(seen[0], (a, vec![(3, AddrStats::one(30)), (5, five)]));
        assert_eq!(seen[1], (b, vec![(9, AddrStats::one(1))]));
        pending.add_stats(&a, 5, &five);
        assert_eq!((pending.entries(), pending.events()), (1, 2));
    }
}
