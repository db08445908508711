//! `watch`: a line each time an app gains an address its report classifies as bad, or its
//! chosen netblock changes and turns good addresses bad (`ipevent-query watch`,
//! `GET /watch`).
//!
//! The [`Watcher`] follows the store's [`ChangeFeed`] (the apps each flush wrote), reads
//! only those apps through the one store reader, classifies them with the one classifier
//! ([`crate::report::classify`]) and compares with what it knew of each app:
//!
//! - an address the app has not had before (for this watcher) that is bad now:
//!   [`Event::BadAddress`], at most once per app and address in a watcher's life;
//! - an address that was good and is bad now, because the chosen /28 moved:
//!   [`Event::NetblockChanged`].
//!
//! What the watcher knew of an app it has not read yet is its addresses first seen before
//! the watcher's `since` (the second it started, or the time asked for), classified the same
//! way: so addresses that arrive from `since` on are new, and older ones are not. With an
//! explicit `since`, the watcher first reads every app once (the backlog), then follows.
//!
//! Memory: per app read while watching, its netblock and its addresses (4 bytes each).

use rustc_hash::FxHashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::block::AddrStats;
use crate::report::{classify, is_host, rfc3339};
use crate::store::{ChangeFeed, Store, StoreError};
use crate::wire::AppSha;

/// How often a follower looks for finished flushes: a line appears at most this long after
/// the flush that caused it (plus the time to read the apps it wrote).
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Mask of a /28 network.
const NETBLOCK_MASK: u32 = !0xf;

/// What happened to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The chosen netblock moved: an address that was good is bad now.
    NetblockChanged,
    /// The app talked to an address it had not had before, and it is bad.
    BadAddress,
}

/// One line of `watch`. Field order is the line's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// What happened.
    pub event: Event,
    /// The app.
    pub app_sha256: String,
    /// The address, dotted.
    pub ip: String,
    /// Events of the app to this address so far.
    pub count: u64,
    /// First arrival at the address (RFC 3339, UTC).
    pub first_seen: String,
    /// Latest arrival at the address (RFC 3339, UTC).
    pub last_seen: String,
    /// The app's chosen /28 now (`a.b.c.d/28`), `null` when no seen address is a host.
    pub netblock: Option<String>,
    /// The chosen /28 before this change, as the watcher knew it.
    pub previous_netblock: Option<String>,
}

impl Transition {
    /// The line: one compact JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("transitions serialise")
    }
}

/// Where the watch starts: lines for addresses first seen from this second on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// The second the watcher starts; no backlog.
    Now,
    /// This Unix second: the watcher first reports what the store holds from then on.
    Time(u32),
}

/// A `--since` that is neither an RFC 3339 time nor a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a time: give an RFC 3339 time (2026-12-01T17:00:00Z) or a duration ago (15m, 2h, 3days)"
)]
pub struct SinceError(pub String);

/// Parses `--since`: an RFC 3339 time (`2026-12-01T17:00:00Z`), or a duration (`15m`, `2h`,
/// `3days`) meaning that long before `now`. It must fall between 1970 and 2106 (the
/// store keeps times as unsigned 32-bit seconds).
pub fn parse_since(text: &str, now: SystemTime) -> Result<Since, SinceError> {
    let bad = || SinceError(text.to_string());
    let trimmed = text.trim();
    let at = if trimmed.starts_with(|c: char| c.is_ascii_digit()) && trimmed.contains('-') {
        humantime::parse_rfc3339_weak(trimmed).map_err(|_| bad())?
    } else {
        let ago = humantime::parse_duration(trimmed).map_err(|_| bad())?;
        now.checked_sub(ago).ok_or_else(bad)?
    };
    let secs = at.duration_since(UNIX_EPOCH).map_err(|_| bad())?.as_secs();
    Ok(Since::Time(u32::try_from(secs).map_err(|_| bad())?))
}

/// What the watcher knows of one app: its chosen netblock and every address it has had.
#[derive(Debug, Clone)]
struct Known {
    netblock: Option<u32>,
    /// Sorted.
    addrs: Box<[u32]>,
}

impl Known {
    /// What is known of an app not read before: its addresses first seen before `since`.
    fn before(addrs: &[(u32, AddrStats)], since: u32) -> Known {
        let old: Vec<(u32, AddrStats)> = addrs
            .iter()
            .filter(|(_, s)| s.first_seen < since)
            .copied()
            .collect();
        Known {
            netblock: classify(&old).netblock,
            addrs: old.iter().map(|(ip, _)| *ip).collect(),
        }
    }

    fn has(&self, ip: u32) -> bool {
        self.addrs.binary_search(&ip).is_ok()
    }

    fn was_good(&self, ip: u32) -> bool {
        self.netblock == Some(ip & NETBLOCK_MASK) && is_host(ip) && self.has(ip)
    }
}

/// Follows a store and turns the flushes it sees into [`Transition`]s.
pub struct Watcher {
    feed: Box<dyn ChangeFeed>,
    since: u32,
    known: FxHashMap<AppSha, Known>,
    changed: Vec<AppSha>,
    /// The backlog of an explicit `since`, handed out by the first poll.
    backlog: Vec<Transition>,
}

impl Watcher {
    /// Starts watching `store`: takes the feed's position first, then, for
    /// [`Since::Time`], reads every app once for the backlog (which the first
    /// [`Watcher::poll`] returns, oldest first). A flush that finishes while the backlog is
    /// read is reported once, by a later poll.
    pub fn start(store: &dyn Store, since: Since) -> Result<Watcher, StoreError> {
        let feed = store.follow_changes()?;
        let mut watcher = Watcher {
            feed,
            since: match since {
                Since::Now => unix_now(),
                Since::Time(at) => at,
            },
            known: FxHashMap::default(),
            changed: Vec::new(),
            backlog: Vec::new(),
        };
        if let Since::Time(_) = since {
            watcher.read_backlog(store)?;
        }
        Ok(watcher)
    }

    /// The second from which addresses count as new.
    pub fn since(&self) -> u32 {
        self.since
    }

    /// Apps the watcher holds what it knows of.
    pub fn apps_known(&self) -> usize {
        self.known.len()
    }

    /// Appends to `out` the transitions of the flushes that finished since the last poll,
    /// in the order they were seen. An app that cannot be read is logged and left for its
    /// next change; an error means the changes themselves could not be followed.
    pub fn poll(&mut self, store: &dyn Store, out: &mut Vec<Transition>) -> Result<(), StoreError> {
        out.append(&mut self.backlog);
        self.changed.clear();
        self.feed.changed(&mut self.changed)?;
        let changed = std::mem::take(&mut self.changed);
        store.read_apps(&changed, &mut |app, read| match read {
            Ok(Some(data)) => self.compare(app, &data.addrs, out),
            // Gone (a reset) before it was read: nothing to report.
            Ok(None) => {}
            Err(e) => log::warn!("watch: app {app} could not be read: {e}"),
        })
    }

    /// Every app once: what changed from `since` on, ordered by when it happened.
    fn read_backlog(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        let mut found: Vec<(String, Transition)> = Vec::new();
        let mut lines = Vec::new();
        let apps: Vec<AppSha> = store.list_apps()?.into_iter().map(|l| l.app).collect();
        store.read_apps(&apps, &mut |app, read| {
            let data = match read {
                Ok(Some(data)) => data,
                Ok(None) => return,
                Err(e) => {
                    log::warn!("watch: app {app} could not be read: {e}");
                    return;
                }
            };
            let newest = data
                .addrs
                .iter()
                .map(|(_, s)| s.first_seen)
                .filter(|first| *first >= self.since)
                .max();
            let Some(newest) = newest else {
                // Nothing new since then: what is known of it is what it holds.
                return;
            };
            lines.clear();
            self.compare(app, &data.addrs, &mut lines);
            for line in lines.drain(..) {
                // A new address happened when it first arrived; a netblock change when the
                // last of the app's new addresses did. RFC 3339 times of one width sort as
                // text.
                let at = match line.event {
                    Event::BadAddress => line.first_seen.clone(),
                    Event::NetblockChanged => rfc3339(newest),
                };
                found.push((at, line));
            }
        })?;
        found.sort_by(|(at_a, a), (at_b, b)| {
            at_a.cmp(at_b)
                .then_with(|| a.app_sha256.cmp(&b.app_sha256))
                .then_with(|| a.event.cmp(&b.event))
                .then_with(|| ip_of(&a.ip).cmp(&ip_of(&b.ip)))
        });
        self.backlog = found.into_iter().map(|(_, line)| line).collect();
        Ok(())
    }

    /// Compares what `app` holds now with what was known of it, appends the transitions
    /// (netblock changes first, then new bad addresses, each by address) and remembers the
    /// new state.
    fn compare(&mut self, app: &AppSha, addrs: &[(u32, AddrStats)], out: &mut Vec<Transition>) {
        let since = self.since;
        let before = self
            .known
            .remove(app)
            .unwrap_or_else(|| Known::before(addrs, since));
        let report = classify(addrs);
        let netblock = report.netblock;
        let line = |event, ip: u32, stats: &AddrStats| Transition {
            event,
            app_sha256: app.to_hex(),
            ip: Ipv4Addr::from(ip).to_string(),
            count: stats.count,
            first_seen: rfc3339(stats.first_seen),
            last_seen: rfc3339(stats.last_seen),
            netblock: netblock.map(cidr28),
            previous_netblock: before.netblock.map(cidr28),
        };
        let is_bad = |ip: u32| !(netblock == Some(ip & NETBLOCK_MASK) && is_host(ip));
        if netblock != before.netblock {
            for (ip, stats) in addrs {
                if is_bad(*ip) && before.was_good(*ip) {
                    out.push(line(Event::NetblockChanged, *ip, stats));
                }
            }
        }
        for (ip, stats) in addrs {
            if is_bad(*ip) && !before.has(*ip) {
                out.push(line(Event::BadAddress, *ip, stats));
            }
        }
        // Every address ever had stays known: a bad address is reported once per watcher.
        let mut all: Vec<u32> = before.addrs.into_vec();
        all.extend(addrs.iter().map(|(ip, _)| *ip));
        all.sort_unstable();
        all.dedup();
        self.known.insert(
            *app,
            Known {
                netblock,
                addrs: all.into_boxed_slice(),
            },
        );
    }
}

fn cidr28(net: u32) -> String {
    format!("{}/28", Ipv4Addr::from(net))
}

fn ip_of(dotted: &str) -> u32 {
    dotted.parse::<Ipv4Addr>().map(u32::from).unwrap_or(0)
}

fn unix_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AppendBlocks, DataDir, StoreWriter};

    fn ip(text: &str) -> u32 {
        u32::from(text.parse::<Ipv4Addr>().unwrap())
    }

    fn at(secs: u32) -> AddrStats {
        AddrStats {
            count: 1,
            first_seen: secs,
            last_seen: secs,
        }
    }

    /// `addrs` sorted by address, as a flush appends them.
    fn records(addrs: &[(&str, u32)]) -> Vec<(u32, AddrStats)> {
        let mut out: Vec<(u32, AddrStats)> =
            addrs.iter().map(|(a, secs)| (ip(a), at(*secs))).collect();
        out.sort_by_key(|(ip, _)| *ip);
        out
    }

    fn store() -> (tempfile::TempDir, DataDir, StoreWriter) {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let writer = StoreWriter::new(data.clone(), "w", false).unwrap();
        (dir, data, writer)
    }

    fn events(lines: &[Transition]) -> Vec<(Event, &str)> {
        lines.iter().map(|l| (l.event, l.ip.as_str())).collect()
    }

    #[test]
    fn new_bad_addresses_and_netblock_changes_once_each() {
        let (_dir, data, mut writer) = store();
        let app = AppSha([1; 32]);
        writer
            .append(
                &app,
                1,
                &records(&[("10.0.0.1", 100), ("10.0.0.2", 100), ("7.7.7.7", 100)]),
            )
            .unwrap();
        let mut watcher = Watcher::start(&data, Since::Time(200)).unwrap();
        let mut out = Vec::new();
        watcher.poll(&data, &mut out).unwrap();
        assert!(out.is_empty(), "nothing from 200 on: {out:?}");

        writer
            .append(&app, 2, &records(&[("8.8.8.8", 300)]))
            .unwrap();
        watcher.poll(&data, &mut out).unwrap();
        assert_eq!(events(&out), [(Event::BadAddress, "8.8.8.8")]);
        assert_eq!(out[0].netblock.as_deref(), Some("10.0.0.0/28"));
        out.clear();

        // Again: known, no line.
        writer
            .append(&app, 3, &records(&[("8.8.8.8", 301)]))
            .unwrap();
        watcher.poll(&data, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");

        // Three hosts of another /28 outnumber the two: the old ones turn bad.
        let moved = [
            (ip("192.168.1.1"), at(302)),
            (ip("192.168.1.2"), at(302)),
            (ip("192.168.1.3"), at(302)),
        ];
        writer.append(&app, 4, &moved).unwrap();
        watcher.poll(&data, &mut out).unwrap();
        assert_eq!(
            events(&out),
            [
                (Event::NetblockChanged, "10.0.0.1"),
                (Event::NetblockChanged, "10.0.0.2")
            ]
        );
        assert_eq!(out[0].previous_netblock.as_deref(), Some("10.0.0.0/28"));
        assert_eq!(out[0].netblock.as_deref(), Some("192.168.1.0/28"));
        let line = out[0].to_json();
        assert!(
            line.starts_with(r#"{"event":"netblock_changed","app_sha256":"0101"#),
            "{line}"
        );
    }

    #[test]
    fn since_reports_the_backlog_oldest_first_then_follows() {
        let (_dir, data, mut writer) = store();
        let (a, b) = (AppSha([1; 32]), AppSha([2; 32]));
        writer
            .append(
                &a,
                1,
                &records(&[("10.0.0.1", 100), ("10.0.0.2", 100), ("9.9.9.9", 250)]),
            )
            .unwrap();
        writer
            .append(
                &b,
                1,
                &records(&[
                    ("10.0.1.1", 100),
                    ("10.0.1.2", 100),
                    ("6.6.6.6", 220),
                    ("5.5.5.5", 150),
                ]),
            )
            .unwrap();
        let mut watcher = Watcher::start(&data, Since::Time(200)).unwrap();
        let mut out = Vec::new();
        watcher.poll(&data, &mut out).unwrap();
        assert_eq!(
            events(&out),
            [
                (Event::BadAddress, "6.6.6.6"),
                (Event::BadAddress, "9.9.9.9")
            ]
        );
        out.clear();
        // The backlog's apps are known: more of the same prints nothing.
        writer.append(&a, 2, &records(&[("9.9.9.9", 400)])).unwrap();
        watcher.poll(&data, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_replaced_index_is_followed_without_repeats() {
        let (_dir, data, mut writer) = store();
        let app = AppSha([3; 32]);
        writer
            .append(&app, 1, &records(&[("10.0.0.1", 100), ("10.0.0.2", 100)]))
            .unwrap();
        let mut watcher = Watcher::start(&data, Since::Time(50)).unwrap();
        let mut out = Vec::new();
        watcher.poll(&data, &mut out).unwrap();
        assert!(out.is_empty());
        writer
            .append(&app, 2, &records(&[("1.1.1.1", 300)]))
            .unwrap();
        drop(writer);
        // A restart settles the index: a new file with a snapshot of every app.
        let mut writer = StoreWriter::new(data.clone(), "w", false).unwrap();
        writer
            .append(&app, 3, &records(&[("2.2.2.2", 301)]))
            .unwrap();
        watcher.poll(&data, &mut out).unwrap();
        assert_eq!(
            events(&out),
            [
                (Event::BadAddress, "1.1.1.1"),
                (Event::BadAddress, "2.2.2.2")
            ]
        );
    }

    #[test]
    fn since_takes_times_and_durations() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(
            parse_since("2001-09-09T01:46:40Z", now),
            Ok(Since::Time(1_000_000_000))
        );
        assert_eq!(parse_since("1h", now), Ok(Since::Time(6_400)));
        assert_eq!(parse_since("90s", now), Ok(Since::Time(9_910)));
        for bad in [
            "",
            "yesterday",
            "2001-13-01T00:00:00Z",
            "5h",
            "2200-01-01T00:00:00Z",
            "-1h",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }
}
