//! Asking the service for an app's report and comparing it with what was sent.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ipevent_core::stats::ReceiverStats;
use ipevent_core::AppSha;
use serde::{Deserialize, Serialize};

/// Name of the query CLI's executable.
pub const QUERY_BIN_NAME: &str = "ipevent-query";

/// How long one API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Where reports come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// `ipevent-query --sync --data-dir DIR <sha>`.
    Query {
        /// The `ipevent-query` executable.
        bin: PathBuf,
        /// The data dir it reads.
        data_dir: PathBuf,
    },
    /// `GET <base>/events/<sha>`.
    Api {
        /// The API's base URL, without a trailing slash.
        base: String,
    },
}

/// The report as the service prints it (contract 2).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ServiceReport {
    /// Events counted.
    pub count: u64,
    /// Good addresses, dotted.
    pub good_ips: Vec<String>,
    /// Bad addresses, dotted.
    pub bad_ips: Vec<String>,
}

/// Finds `ipevent-query`: `explicit` if given, else next to this executable, else on `PATH`.
pub fn find_query_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--query-bin {}: no such file", path.display());
        }
        return Ok(path.to_path_buf());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(QUERY_BIN_NAME)));
    if let Some(path) = beside.as_ref().filter(|p| p.is_file()) {
        return Ok(path.clone());
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(QUERY_BIN_NAME);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("{QUERY_BIN_NAME} not found next to this executable or on PATH; pass --query-bin")
}

impl Source {
    /// Where the reports come from, for the summary.
    pub fn describe(&self) -> String {
        match self {
            Source::Query { bin, data_dir } => {
                format!("{} --sync --data-dir {}", bin.display(), data_dir.display())
            }
            Source::Api { base } => format!("{base}/events/<sha>"),
        }
    }

    /// The service's report on `app`; `None` when the service does not know the app.
    pub fn fetch(&self, app: &AppSha) -> anyhow::Result<Option<ServiceReport>> {
        let sha = app.to_hex();
        match self {
            Source::Query { bin, data_dir } => {
                let output = Command::new(bin)
                    .arg("--sync")
                    .arg("--data-dir")
                    .arg(data_dir)
                    .arg(&sha)
                    .output()
                    .with_context(|| format!("running {}", bin.display()))?;
                let stderr = String::from_utf8_lossy(&output.stderr);
                let message = stderr.trim().lines().last().unwrap_or("").to_string();
                match output.status.code() {
                    Some(0) => serde_json::from_slice(&output.stdout)
                        .map(Some)
                        .with_context(|| format!("{QUERY_BIN_NAME} {sha} printed no report")),
                    // Exit 1 is "unknown app": nothing of it reached the store.
                    Some(1) => {
                        log::info!("{QUERY_BIN_NAME} {sha}: {message}");
                        Ok(None)
                    }
                    _ => Err(anyhow!(
                        "{QUERY_BIN_NAME} {sha} failed ({}): {message}",
                        output.status
                    )),
                }
            }
            Source::Api { base } => {
                let url = format!("{base}/events/{sha}");
                let agent = ureq::AgentBuilder::new().timeout(API_TIMEOUT).build();
                match agent.get(&url).set("Accept", "application/json").call() {
                    Ok(response) => {
                        let body = response
                            .into_string()
                            .with_context(|| format!("GET {url}: reading the body"))?;
                        serde_json::from_str(&body)
                            .map(Some)
                            .with_context(|| format!("GET {url}: the body is no report"))
                    }
                    Err(ureq::Error::Status(404, _)) => Ok(None),
                    Err(ureq::Error::Status(status, response)) => {
                        let body = response.into_string().unwrap_or_default();
                        Err(anyhow!("GET {url}: status {status}: {}", body.trim()))
                    }
                    Err(e) => Err(anyhow!("GET {url}: {e}")),
                }
            }
        }
    }
}

/// Metrics of the API whose values, summed over every receiver, make
/// [`Source::datagrams_taken`].
const TAKEN_METRICS: [&str; 2] = [
    "ipevent_receiver_datagrams_received_total",
    "ipevent_receiver_kernel_drops_total",
];

impl Source {
    /// Datagrams the receivers behind this source have read, or seen dropped by the kernel,
    /// as their latest counters say (`datagrams_received` plus `kernel_drops`, every receiver
    /// together): their `stats.json` files in the data dir, or the API's `/metrics`. The
    /// counters are as fresh as the receivers' stats interval.
    pub fn datagrams_taken(&self) -> anyhow::Result<u64> {
        match self {
            Source::Query { data_dir, .. } => {
                let data = ipevent_core::DataDir::new(data_dir);
                let mut taken = 0;
                for (writer_id, stats) in ReceiverStats::read_all(&data)
                    .with_context(|| format!("listing the receivers of {}", data_dir.display()))?
                {
                    let stats = stats
                        .with_context(|| format!("reading the stats of receiver {writer_id}"))?;
                    taken += stats.datagrams_received + stats.kernel_drops;
                }
                Ok(taken)
            }
            Source::Api { base } => {
                let url = format!("{base}/metrics");
                let agent = ureq::AgentBuilder::new().timeout(API_TIMEOUT).build();
                let text = agent
                    .get(&url)
                    .call()
                    .map_err(|e| anyhow!("GET {url}: {e}"))?
                    .into_string()
                    .with_context(|| format!("GET {url}: reading the body"))?;
                Ok(sum_metrics(&text, &TAKEN_METRICS))
            }
        }
    }
}

/// The sum of every sample of the metrics `names` in a Prometheus text exposition.
fn sum_metrics(text: &str, names: &[&str]) -> u64 {
    text.lines()
        .filter(|line| {
            names.iter().any(|name| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// What one app should show: every valid event sent, the hosts sent as good and the
/// outsiders sent as bad.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The app.
    pub app: AppSha,
    /// Valid events the kernel took.
    pub count: u64,
    /// Hosts of its /28 that got at least one event, ascending.
    pub good: Vec<u32>,
    /// Outsiders that got at least one event, ascending.
    pub bad: Vec<u32>,
}

/// The check of one app.
#[derive(Clone, Debug, Serialize)]
pub struct AppCheck {
    /// The app.
    pub sha: String,
    /// Valid events sent.
    pub expected_count: u64,
    /// What the service reports (0 for an unknown app).
    pub reported_count: u64,
    /// Sent but not counted.
    pub dropped: u64,
    /// Counted but never sent in this run (earlier data under the same SHA, or a bug).
    pub extra: u64,
    /// Share of what was sent that the service counted, in percent.
    pub handled_pct: f64,
    /// The good list is exactly the hosts sent.
    pub good_ok: bool,
    /// The bad list is exactly the outsiders sent.
    pub bad_ok: bool,
    /// Sent hosts missing from the good list.
    pub missing_good: Vec<String>,
    /// Good addresses that are not sent hosts.
    pub unexpected_good: Vec<String>,
    /// Sent outsiders missing from the bad list.
    pub missing_bad: Vec<String>,
    /// Bad addresses that are not sent outsiders.
    pub unexpected_bad: Vec<String>,
    /// Why no report could be had.
    pub error: Option<String>,
    /// Lists match, nothing extra, and drops within the allowance.
    pub ok: bool,
}

/// The verification of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    /// Where the reports came from.
    pub source: String,
    /// Valid events sent for the checked apps.
    pub expected: u64,
    /// Events the service reports for them, at most what was sent per app.
    pub reported: u64,
    /// Sent but not counted, checked apps together.
    pub dropped: u64,
    /// `reported` as a share of `expected`, in percent.
    pub handled_pct: f64,
    /// The allowance for drops, in percent (0: none).
    pub max_drop_pct: f64,
    /// Per app.
    pub apps: Vec<AppCheck>,
    /// Every app is ok.
    pub ok: bool,
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn dotted(ips: impl IntoIterator<Item = u32>) -> Vec<String> {
    ips.into_iter()
        .map(|ip| Ipv4Addr::from(ip).to_string())
        .collect()
}

/// Parses the service's dotted addresses.
fn parse_ips(list: &[String]) -> anyhow::Result<BTreeSet<u32>> {
    list.iter()
        .map(|s| {
            s.parse::<Ipv4Addr>()
                .map(u32::from)
                .with_context(|| format!("the report lists {s:?}, which is no IPv4 address"))
        })
        .collect()
}

/// Compares one app's report (`None`: unknown app) with what was sent.
pub fn check_app(
    expected: &Expected,
    reported: anyhow::Result<Option<ServiceReport>>,
    max_drop_pct: f64,
) -> AppCheck {
    let mut check = AppCheck {
        sha: expected.app.to_hex(),
        expected_count: expected.count,
        reported_count: 0,
        dropped: expected.count,
        extra: 0,
        handled_pct: pct(0, expected.count),
        good_ok: false,
        bad_ok: false,
        missing_good: dotted(expected.good.iter().copied()),
        unexpected_good: Vec::new(),
        missing_bad: dotted(expected.bad.iter().copied()),
        unexpected_bad: Vec::new(),
        error: None,
        ok: false,
    };
    let report = match reported {
        Ok(Some(report)) => report,
        Ok(None) => ServiceReport {
            count: 0,
            good_ips: Vec::new(),
            bad_ips: Vec::new(),
        },
        Err(e) => {
            check.error = Some(format!("{e:#}"));
            return check;
        }
    };
    let (good, bad) = match (parse_ips(&report.good_ips), parse_ips(&report.bad_ips)) {
        (Ok(good), Ok(bad)) => (good, bad),
        (Err(e), _) | (_, Err(e)) => {
            check.error = Some(format!("{e:#}"));
            return check;
        }
    };
    let want_good: BTreeSet<u32> = expected.good.iter().copied().collect();
    let want_bad: BTreeSet<u32> = expected.bad.iter().copied().collect();
    check.reported_count = report.count;
    check.dropped = expected.count.saturating_sub(report.count);
    check.extra = report.count.saturating_sub(expected.count);
    check.handled_pct = pct(report.count.min(expected.count), expected.count);
    check.missing_good = dotted(want_good.difference(&good).copied());
    check.unexpected_good = dotted(good.difference(&want_good).copied());
    check.missing_bad = dotted(want_bad.difference(&bad).copied());
    check.unexpected_bad = dotted(bad.difference(&want_bad).copied());
    check.good_ok = check.missing_good.is_empty() && check.unexpected_good.is_empty();
    check.bad_ok = check.missing_bad.is_empty() && check.unexpected_bad.is_empty();
    let drop_ok = if max_drop_pct <= 0.0 {
        check.dropped == 0
    } else {
        100.0 - check.handled_pct <= max_drop_pct
    };
    check.ok = check.good_ok && check.bad_ok && check.extra == 0 && drop_ok;
    check
}

/// Fetches and checks every app in `expected`.
pub fn verify(source: &Source, expected: &[Expected], max_drop_pct: f64) -> Verification {
    let apps: Vec<AppCheck> = expected
        .iter()
        .map(|want| check_app(want, source.fetch(&want.app), max_drop_pct))
        .collect();
    let expected_total: u64 = apps.iter().map(|a| a.expected_count).sum();
    let reported: u64 = apps
        .iter()
        .map(|a| a.reported_count.min(a.expected_count))
        .sum();
    Verification {
        source: source.describe(),
        expected: expected_total,
        reported,
        dropped: expected_total - reported,
        handled_pct: pct(reported, expected_total),
        max_drop_pct,
        ok: apps.iter().all(|a| a.ok),
        apps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Expected {
        Expected {
            app: AppSha([1; 32]),
            count: 100,
            good: vec![0x0a00_0001, 0x0a00_0002],
            bad: vec![0x0808_0808],
        }
    }

    fn report(count: u64, good: &[&str], bad: &[&str]) -> anyhow::Result<Option<ServiceReport>> {
        Ok(Some(ServiceReport {
            count,
            good_ips: good.iter().map(|s| s.to_string()).collect(),
            bad_ips: bad.iter().map(|s| s.to_string()).collect(),
        }))
    }

    #[test]
    fn metrics_are_summed_over_receivers_by_exact_name() {
        let text = "\
# TYPE ipevent_receiver_datagrams_received_total counter
ipevent_receiver_datagrams_received_total{writer_id=\"a\"} 7
ipevent_receiver_datagrams_received_total{writer_id=\"b\"} 1000000
ipevent_receiver_datagrams_received_total_extra{writer_id=\"a\"} 5
ipevent_receiver_kernel_drops_total{writer_id=\"a\"} 2
ipevent_receiver_events_accepted_total{writer_id=\"a\"} 3
";
        assert_eq!(sum_metrics(text, &TAKEN_METRICS), 1_000_009);
    }

    #[test]
    fn an_exact_report_passes() {
        let check = check_app(
            &expected(),
            report(100, &["10.0.0.1", "10.0.0.2"], &["8.8.8.8"]),
            0.0,
        );
        assert!(check.ok, "{check:?}");
        assert_eq!(
            (check.dropped, check.extra, check.handled_pct),
            (0, 0, 100.0)
        );
    }

    #[test]
    fn drops_fail_unless_allowed() {
        let lossy = || report(97, &["10.0.0.1", "10.0.0.2"], &["8.8.8.8"]);
        let strict = check_app(&expected(), lossy(), 0.0);
        assert!(!strict.ok);
        assert_eq!(strict.dropped, 3);
        assert!(check_app(&expected(), lossy(), 5.0).ok);
        assert!(!check_app(&expected(), lossy(), 2.0).ok);
    }

    #[test]
    fn wrong_lists_extra_events_and_unknown_apps_fail() {
        let swapped = check_app(
            &expected(),
            report(100, &["10.0.0.1"], &["10.0.0.2", "8.8.8.8"]),
            50.0,
        );
        assert!(!swapped.ok && !swapped.good_ok && !swapped.bad_ok);
        assert_eq!(swapped.missing_good, vec!["10.0.0.2"]);
        assert_eq!(swapped.unexpected_bad, vec!["10.0.0.2"]);
        let extra = check_app(
            &expected(),
            report(101, &["10.0.0.1", "10.0.0.2"], &["8.8.8.8"]),
            50.0,
        );
        assert_eq!(extra.extra, 1);
        assert!(!extra.ok);
        let unknown = check_app(&expected(), Ok(None), 0.0);
        assert_eq!((unknown.ok, unknown.dropped), (false, 100));
        let broken = check_app(
            &expected(),
            report(100, &["10.0.0.1", "nonsense"], &[]),
            0.0,
        );
        assert!(broken.error.unwrap().contains("nonsense"));
    }
}
