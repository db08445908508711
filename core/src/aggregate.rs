//! Folding accepted events into per-app, per-address counts between flushes.

use rustc_hash::FxHashMap;

use crate::store::AddrStats;
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

/// One app's pending addresses.
pub type AddrMap = FxHashMap<u32, AddrStats>;

/// Events waiting for the next flush: app -> address -> (count, first, last).
#[derive(Default, Debug)]
pub struct Pending {
    apps: FxHashMap<AppSha, AddrMap>,
    entries: usize,
    events: u64,
}

impl Pending {
    /// Folds `records` in.
    pub fn add(&mut self, records: &[Record]) {
        for r in records {
            let addrs = self.apps.entry(r.app).or_default();
            match addrs.get_mut(&r.ip) {
                Some(stats) => {
                    stats.count += 1;
                    stats.first_seen = stats.first_seen.min(r.unix_secs);
                    stats.last_seen = stats.last_seen.max(r.unix_secs);
                }
                None => {
                    addrs.insert(r.ip, AddrStats::one(r.unix_secs));
                    self.entries += 1;
                }
            }
        }
        self.events += records.len() as u64;
    }

    /// Distinct (app, address) pairs held: what bounds memory.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Events held.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Apps held.
    pub fn apps(&self) -> usize {
        self.apps.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// Takes everything out, leaving this empty.
    pub fn take(&mut self) -> FxHashMap<AppSha, AddrMap> {
        self.entries = 0;
        self.events = 0;
        std::mem::take(&mut self.apps)
    }

    /// Puts one app's addresses back (a flush that failed for it). The app must not be held.
    pub fn put_back(&mut self, app: AppSha, addrs: AddrMap) {
        self.entries += addrs.len();
        self.events += addrs.values().map(|s| s.count).sum::<u64>();
        let previous = self.apps.insert(app, addrs);
        assert!(previous.is_none(), "put_back of an app still held");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_counts_and_times() {
        let app = AppSha([1; 32]);
        let mut pending = Pending::default();
        pending.add(&[
            Record {
                app,
                ip: 5,
                unix_secs: 20,
            },
            Record {
                app,
                ip: 5,
                unix_secs: 10,
            },
            Record {
                app,
                ip: 6,
                unix_secs: 30,
            },
        ]);
        assert_eq!(
            (pending.entries(), pending.events(), pending.apps()),
            (2, 3, 1)
        );
        let mut apps = pending.take();
        assert!(pending.is_empty());
        let addrs = apps.remove(&app).unwrap();
        assert_eq!(
            addrs[&5],
            AddrStats {
                count: 2,
                first_seen: 10,
                last_seen: 20
            }
        );
        pending.put_back(app, addrs);
        assert_eq!((pending.entries(), pending.events()), (2, 3));
    }
}
