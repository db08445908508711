//! The report: which addresses of an app are good and which are bad (contract 2 of
//! ARCHITECTURE.md).
//!
//! An app normally talks to the hosts of one /28 netblock. Good addresses are the seen host
//! addresses (.1 to .14 of the netblock) of the /28 holding the most distinct seen hosts; ties
//! go to the netblock whose hosts had more events, then to the lower netblock, so the answer
//! never depends on arrival order. Every other seen address, including a netblock's network
//! (.0) and broadcast (.15) address, is bad. [`classify`] is the only classifier in the
//! project, and [`report_json`] the one way from a SHA to its JSON.

use rustc_hash::FxHashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::Serialize;

use crate::block::AddrStats;
use crate::store::{AppData, Store, StoreError};
use crate::wire::AppSha;

/// Mask of a /28 network.
const NETBLOCK_MASK: u32 = !0xf;

/// True for the 14 host addresses of a /28 (not its network or broadcast address).
#[inline]
pub fn is_host(ip: u32) -> bool {
    matches!(ip & 0xf, 1..=14)
}

/// The classification of one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Every valid event of the app.
    pub count: u64,
    /// Good addresses, ascending.
    pub good: Vec<u32>,
    /// Bad addresses, ascending.
    pub bad: Vec<u32>,
    /// Network address of the chosen /28, if any seen address is a host.
    pub netblock: Option<u32>,
}

/// Classifies an app's addresses. `addrs` may come in any order but must not repeat an
/// address.
pub fn classify(addrs: &[(u32, AddrStats)]) -> Report {
    // Per /28: (distinct seen hosts, events on them).
    let mut netblocks: FxHashMap<u32, (u32, u64)> = FxHashMap::default();
    let mut count = 0u64;
    for (ip, stats) in addrs {
        count += stats.count;
        if is_host(*ip) {
            let entry = netblocks.entry(ip & NETBLOCK_MASK).or_default();
            entry.0 += 1;
            entry.1 += stats.count;
        }
    }
    let netblock = netblocks
        .into_iter()
        .max_by(|(net_a, a), (net_b, b)| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(net_b.cmp(net_a)))
        .map(|(net, _)| net);
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (ip, _) in addrs {
        if Some(ip & NETBLOCK_MASK) == netblock && is_host(*ip) {
            good.push(*ip);
        } else {
            bad.push(*ip);
        }
    }
    good.sort_unstable();
    bad.sort_unstable();
    Report {
        count,
        good,
        bad,
        netblock,
    }
}

fn dotted(ip: u32) -> String {
    Ipv4Addr::from(ip).to_string()
}

pub(crate) fn rfc3339(unix_secs: u32) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(unix_secs));
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The default shape, exactly `{"count":N,"good_ips":[...],"bad_ips":[...]}`.
#[derive(Serialize)]
struct Plain<'a> {
    count: u64,
    good_ips: &'a [String],
    bad_ips: &'a [String],
}

/// One address in the detailed view.
#[derive(Serialize)]
struct DetailAddr {
    ip: String,
    good: bool,
    count: u64,
    first_seen: String,
    last_seen: String,
}

/// The detailed view: the default fields first, then the chosen netblock and every address.
#[derive(Serialize)]
struct Detail<'a> {
    count: u64,
    good_ips: &'a [String],
    bad_ips: &'a [String],
    netblock: Option<String>,
    addresses: Vec<DetailAddr>,
}

impl Report {
    /// Classifies what the store holds for one app.
    pub fn from_app(data: &AppData) -> Report {
        classify(&data.addrs)
    }

    /// Good addresses as dotted quads.
    pub fn good_ips(&self) -> Vec<String> {
        self.good.iter().copied().map(dotted).collect()
    }

    /// Bad addresses as dotted quads.
    pub fn bad_ips(&self) -> Vec<String> {
        self.bad.iter().copied().map(dotted).collect()
    }

    /// The report as contract 2 prints it; `pretty` indents it.
    pub fn to_json(&self, pretty: bool) -> String {
        let (good, bad) = (self.good_ips(), self.bad_ips());
        let plain = Plain {
            count: self.count,
            good_ips: &good,
            bad_ips: &bad,
        };
        to_string(&plain, pretty)
    }

    /// The report with the chosen /28 and, per address, its count and first and last arrival
    /// (RFC 3339, UTC). `addrs` is what the report was made from.
    pub fn to_detail_json(&self, addrs: &[(u32, AddrStats)], pretty: bool) -> String {
        let (good, bad) = (self.good_ips(), self.bad_ips());
        let mut addresses: Vec<DetailAddr> = addrs
            .iter()
            .map(|(ip, stats)| DetailAddr {
                ip: dotted(*ip),
                good: self.good.binary_search(ip).is_ok(),
                count: stats.count,
                first_seen: rfc3339(stats.first_seen),
                last_seen: rfc3339(stats.last_seen),
            })
            .collect();
        addresses.sort_by_key(|a| a.ip.parse::<Ipv4Addr>().map(u32::from).unwrap_or(0));
        let detail = Detail {
            count: self.count,
            good_ips: &good,
            bad_ips: &bad,
            netblock: self.netblock.map(|net| format!("{}/28", dotted(net))),
            addresses,
        };
        to_string(&detail, pretty)
    }
}

/// How a report is rendered: the default shape or `detail`, compact or `pretty`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JsonView {
    /// Add the chosen /28 and, per address, its count and first and last arrival.
    pub detail: bool,
    /// Indent the JSON.
    pub pretty: bool,
}

/// One app's report JSON, and the logs whose tails did not verify and were not counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportJson {
    /// The report, rendered as asked.
    pub json: String,
    /// Logs whose tail did not verify, with the offset where counting stopped.
    pub torn: Vec<(PathBuf, u64)>,
    /// Logs that could not be read at all, with why.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Reads `app` from `store`, classifies it and renders it: the one way from a SHA to its JSON,
/// for the query CLI and the API alike. `Ok(None)` when the store has never seen the app.
pub fn report_json(
    store: &(impl Store + ?Sized),
    app: &AppSha,
    view: JsonView,
) -> Result<Option<ReportJson>, StoreError> {
    let Some(data) = store.read_app(app)? else {
        return Ok(None);
    };
    let report = Report::from_app(&data);
    let json = if view.detail {
        report.to_detail_json(&data.addrs, view.pretty)
    } else {
        report.to_json(view.pretty)
    };
    Ok(Some(ReportJson {
        json,
        torn: data.torn,
        unreadable: data.unreadable,
    }))
}

fn to_string(value: &impl Serialize, pretty: bool) -> String {
    let result = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    };
    // Serialising plain strings and integers cannot fail.
    result.expect("report serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[(&str, u64)]) -> Vec<(u32, AddrStats)> {
        list.iter()
            .map(|(ip, n)| {
                (
                    u32::from(ip.parse::<Ipv4Addr>().unwrap()),
                    AddrStats {
                        count: *n,
                        first_seen: 1,
                        last_seen: 2,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn empty_app_has_no_netblock() {
        let report = classify(&[]);
        assert_eq!(
            report.to_json(false),
            r#"{"count":0,"good_ips":[],"bad_ips":[]}"#
        );
        assert_eq!(report.netblock, None);
    }

    #[test]
    fn only_non_hosts_are_all_bad() {
        let report = classify(&addrs(&[("10.0.0.0", 1), ("10.0.0.15", 2)]));
        assert!(report.good.is_empty());
        assert_eq!(report.bad.len(), 2);
        assert_eq!(report.count, 3);
    }

    #[test]
    fn detail_keeps_the_default_fields_first() {
        let data = addrs(&[("10.0.0.1", 2), ("9.9.9.9", 1)]);
        let report = classify(&data);
        let detail = report.to_detail_json(&data, false);
        assert!(detail.starts_with(r#"{"count":3,"good_ips":["10.0.0.1"],"bad_ips":["9.9.9.9"],"netblock":"10.0.0.0/28""#), "{detail}");
        assert!(detail.contains(r#""first_seen":"1970-01-01T00:00:01Z""#));
    }

    #[test]
    fn report_json_reads_classifies_and_renders_every_view() {
        use crate::store::{AppendBlocks, DataDir, StoreWriter};
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let app = AppSha([7; 32]);
        let stored = addrs(&[("9.9.9.9", 1), ("10.0.0.1", 2)]);
        let mut writer = StoreWriter::new(data.clone(), "w", false).unwrap();
        writer.append(&app, 1, &stored).unwrap();
        let report = classify(&stored);
        for detail in [false, true] {
            for pretty in [false, true] {
                let got = report_json(&data, &app, JsonView { detail, pretty })
                    .unwrap()
                    .unwrap();
                let expect = if detail {
                    report.to_detail_json(&stored, pretty)
                } else {
                    report.to_json(pretty)
                };
                assert_eq!(got.json, expect, "detail {detail} pretty {pretty}");
                assert!(got.torn.is_empty());
            }
        }
        let unknown = AppSha([8; 32]);
        assert!(report_json(&data, &unknown, JsonView::default())
            .unwrap()
            .is_none());
    }
}
