//! `/metrics`: the receivers' counters (from their stats files) and the API's own, in the
//! Prometheus text exposition format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipevent_core::stats::ReceiverStats;
use ipevent_core::wire::Reject;

use crate::serve::ConnCounters;
use crate::sync::SyncOutcome;

/// Upper bounds of the request latency histogram buckets, in seconds.
const LATENCY_BUCKETS_SECS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Route label of requests no route matched, so that scanners cannot grow the label set.
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Default)]
struct Histogram {
    /// Per bucket of [`LATENCY_BUCKETS_SECS`], not cumulative; `+Inf` is `count`.
    buckets: [u64; LATENCY_BUCKETS_SECS.len()],
    count: u64,
    sum_secs: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if let Some(i) = LATENCY_BUCKETS_SECS.iter().position(|le| secs <= *le) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_secs += secs;
    }
}

/// Requests by (route, method, status).
type RequestKey = (&'static str, &'static str, u16);

/// The API's own counters. Event counters (what `POST /events` took or refused) start again
/// from zero at each reset, like the receivers'; request counters count from the start.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<RequestKey, u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    post_accepted: AtomicU64,
    post_rejected: [AtomicU64; Reject::COUNT],
    post_store_errors: AtomicU64,
    sync_rounds: [AtomicU64; SyncOutcome::ALL.len()],
    resets: AtomicU64,
    reset_failures: AtomicU64,
    /// The connection loop's counters.
    pub conns: Arc<ConnCounters>,
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, route: &'static str, method: &'static str, status: u16, took: Duration) {
        *lock(&self.requests)
            .entry((route, method, status))
            .or_default() += 1;
        lock(&self.latency)
            .entry(route)
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// Counts an event `POST /events` stored.
    pub fn post_accepted(&self) {
        self.post_accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an event `POST /events` refused.
    pub fn post_rejected(&self, reason: Reject) {
        self.post_rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a valid event the store could not take.
    pub fn post_store_error(&self) {
        self.post_store_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished sync round.
    pub fn sync_round(&self, outcome: SyncOutcome) {
        self.sync_rounds[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a reset, successful or not; a successful one zeroes the event counters.
    pub fn reset(&self, ok: bool) {
        if ok {
            self.resets.fetch_add(1, Ordering::Relaxed);
            self.post_accepted.store(0, Ordering::Relaxed);
            self.post_store_errors.store(0, Ordering::Relaxed);
            for counter in &self.post_rejected {
                counter.store(0, Ordering::Relaxed);
            }
        } else {
            self.reset_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The exposition text: every receiver's counters, then the API's.
    pub fn render(&self, receivers: &[ReceiverStats], version: &str) -> String {
        let mut out = String::with_capacity(8192);
        render_receivers(&mut out, receivers);
        self.render_api(&mut out, version);
        out
    }

    fn render_api(&self, out: &mut String, version: &str) {
        header(
            out,
            "ipevent_api_build_info",
            "gauge",
            "Version of the running API.",
        );
        let _ = writeln!(
            out,
            "ipevent_api_build_info{{version=\"{}\"}} 1",
            escape(version)
        );
        self.render_requests(out);
        for family in API_FAMILIES {
            header(out, family.name, family.kind, family.help);
            for (labels, value) in (family.samples)(self) {
                let _ = writeln!(out, "{}{labels} {value}", family.name);
            }
        }
    }

    /// Requests by route, method and status, and their latency by route.
    fn render_requests(&self, out: &mut String) {
        header(
            out,
            "ipevent_api_requests_total",
            "counter",
            "HTTP requests answered, by route, method and status.",
        );
        for ((route, method, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "ipevent_api_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        const LATENCY: &str = "ipevent_api_request_duration_seconds";
        header(
            out,
            LATENCY,
            "histogram",
            "Time to answer a request, by route.",
        );
        for (route, h) in lock(&self.latency).iter() {
            let route = escape(route);
            let mut cumulative = 0;
            for (le, n) in LATENCY_BUCKETS_SECS.iter().zip(h.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "{LATENCY}_bucket{{route=\"{route}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{LATENCY}_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "{LATENCY}_sum{{route=\"{route}\"}} {}", h.sum_secs);
            let _ = writeln!(out, "{LATENCY}_count{{route=\"{route}\"}} {}", h.count);
        }
    }
}

/// One family of the API's own metrics: its name, type, help and samples (labels, value).
struct ApiFamily {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: fn(&Metrics) -> Vec<(String, u64)>,
}

/// One unlabelled sample.
fn single(counter: &AtomicU64) -> Vec<(String, u64)> {
    vec![(String::new(), load(counter))]
}

#[rustfmt::skip]
const API_FAMILIES: &[ApiFamily] = &[
    ApiFamily { name: "ipevent_api_post_events_accepted_total", kind: "counter", help: "Events POST /events stored (since the last reset).", samples: |m| single(&m.post_accepted) },
    ApiFamily { name: "ipevent_api_post_events_rejected_total", kind: "counter", help: "Bodies POST /events refused, by reason (since the last reset).", samples: |m| {
        Reject::ALL.iter().map(|r| (format!("{{reason=\"{}\"}}", r.name()), load(&m.post_rejected[r.index()]))).collect()
    } },
    ApiFamily { name: "ipevent_api_post_store_errors_total", kind: "counter", help: "Valid events POST /events could not store (answered 500).", samples: |m| single(&m.post_store_errors) },
    ApiFamily { name: "ipevent_api_sync_rounds_total", kind: "counter", help: "Syncs with the receivers before reads, by result (ok, none running, failed).", samples: |m| {
        SyncOutcome::ALL.iter().map(|o| (format!("{{result=\"{}\"}}", o.name()), load(&m.sync_rounds[o.index()]))).collect()
    } },
    ApiFamily { name: "ipevent_api_sync_failures_total", kind: "counter", help: "Syncs in which a receiver did not confirm its flush.", samples: |m| single(&m.sync_rounds[SyncOutcome::Failed.index()]) },
    ApiFamily { name: "ipevent_api_resets_total", kind: "counter", help: "Completed resets (DELETE /events).", samples: |m| single(&m.resets) },
    ApiFamily { name: "ipevent_api_reset_failures_total", kind: "counter", help: "Resets that failed or that a receiver refused.", samples: |m| single(&m.reset_failures) },
    ApiFamily { name: "ipevent_api_connections_accepted_total", kind: "counter", help: "HTTP connections accepted.", samples: |m| single(&m.conns.accepted) },
    ApiFamily { name: "ipevent_api_connections_shed_total", kind: "counter", help: "Connections closed to make room for a new one (the one waiting longest for a request).", samples: |m| single(&m.conns.shed) },
    ApiFamily { name: "ipevent_api_connections_refused_total", kind: "counter", help: "New connections closed at once because every open one was answering a request.", samples: |m| single(&m.conns.refused) },
    ApiFamily { name: "ipevent_api_accept_fd_exhausted_total", kind: "counter", help: "Accepts that failed for lack of file descriptors.", samples: |m| single(&m.conns.fd_exhausted) },
];

/// One receiver counter: its name, type, help and how to read it from a snapshot.
struct ReceiverMetric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&ReceiverStats) -> f64,
}

const RECEIVER_METRICS: &[ReceiverMetric] = &[
    ReceiverMetric { name: "ipevent_receiver_datagrams_received_total", kind: "counter", help: "Datagrams read from the sockets.", value: |s| s.datagrams_received as f64 },
    ReceiverMetric { name: "ipevent_receiver_events_accepted_total", kind: "counter", help: "Datagrams that decoded into a valid event.", value: |s| s.events_accepted as f64 },
    ReceiverMetric { name: "ipevent_receiver_rejected_all_total", kind: "counter", help: "Datagrams refused, all reasons together.", value: |s| s.rejected_total as f64 },
    ReceiverMetric { name: "ipevent_receiver_kernel_drops_total", kind: "counter", help: "Datagrams the kernel dropped before the receiver read them.", value: |s| s.kernel_drops as f64 },
    ReceiverMetric { name: "ipevent_receiver_events_flushed_total", kind: "counter", help: "Events written to the store.", value: |s| s.events_flushed as f64 },
    ReceiverMetric { name: "ipevent_receiver_events_pending", kind: "gauge", help: "Events accepted but not yet written.", value: |s| s.events_pending as f64 },
    ReceiverMetric { name: "ipevent_receiver_flushes_total", kind: "counter", help: "Completed flushes.", value: |s| s.flushes as f64 },
    ReceiverMetric { name: "ipevent_receiver_flush_errors_total", kind: "counter", help: "Flushes that failed to write some app.", value: |s| s.flush_errors as f64 },
    ReceiverMetric { name: "ipevent_receiver_flush_seconds_total", kind: "counter", help: "Time spent flushing.", value: |s| s.flush_total_ms / 1000.0 },
    ReceiverMetric { name: "ipevent_receiver_flush_last_seconds", kind: "gauge", help: "Duration of the last flush.", value: |s| s.flush_last_ms / 1000.0 },
    ReceiverMetric { name: "ipevent_receiver_flush_max_seconds", kind: "gauge", help: "Longest flush.", value: |s| s.flush_max_ms / 1000.0 },
    ReceiverMetric { name: "ipevent_receiver_epoch", kind: "gauge", help: "Current flush epoch.", value: |s| s.epoch as f64 },
    ReceiverMetric { name: "ipevent_receiver_events_refused_total", kind: "counter", help: "Accepted events dropped because their app was new and --max-apps or the free-space thresholds stopped new apps.", value: |s| s.events_refused as f64 },
    ReceiverMetric { name: "ipevent_receiver_events_replayed_total", kind: "counter", help: "Accepted events recovered from the journal at start.", value: |s| s.events_replayed as f64 },
    ReceiverMetric { name: "ipevent_receiver_journal_used_bytes", kind: "gauge", help: "Bytes of the journal in use (accepted events not yet in the store).", value: |s| s.journal_used_bytes as f64 },
    ReceiverMetric { name: "ipevent_receiver_journal_capacity_bytes", kind: "gauge", help: "Bytes the journal can hold.", value: |s| s.journal_capacity_bytes as f64 },
    ReceiverMetric { name: "ipevent_receiver_stalled", kind: "gauge", help: "1 while the journal is full and the store cannot be written (ingest waits).", value: |s| f64::from(u8::from(s.stalled)) },
    ReceiverMetric { name: "ipevent_receiver_last_stop_clean", kind: "gauge", help: "1 when the previous run stopped cleanly.", value: |s| f64::from(u8::from(s.last_stop_clean)) },
    ReceiverMetric { name: "ipevent_receiver_control_conns_full_total", kind: "counter", help: "Control connections that arrived while every control slot was taken.", value: |s| s.control_conns_full as f64 },
    ReceiverMetric { name: "ipevent_receiver_resets_total", kind: "counter", help: "Resets served.", value: |s| s.resets as f64 },
    ReceiverMetric { name: "ipevent_receiver_apps_expired_total", kind: "counter", help: "Apps removed by the retention sweep (--retain-days).", value: |s| s.apps_expired as f64 },
    ReceiverMetric { name: "ipevent_receiver_ship_lag_epochs", kind: "gauge", help: "Flushes in the outbox not yet shipped to the bucket (--store).", value: |s| s.ship_lag_epochs as f64 },
    ReceiverMetric { name: "ipevent_receiver_outbox_bytes", kind: "gauge", help: "Bytes of those flushes on local disk.", value: |s| s.outbox_bytes as f64 },
    ReceiverMetric { name: "ipevent_receiver_shipped_epoch", kind: "gauge", help: "Last flush epoch durable in the bucket.", value: |s| s.shipped_epoch as f64 },
    ReceiverMetric { name: "ipevent_receiver_ship_errors_total", kind: "counter", help: "Failed attempts to reach or write the bucket (retried).", value: |s| s.ship_errors as f64 },
    ReceiverMetric { name: "ipevent_receiver_outbox_errors_total", kind: "counter", help: "Flushes the outbox could not take (below --min-free-bytes, I/O error); their events wait in memory and the journal.", value: |s| s.outbox_errors as f64 },
    ReceiverMetric { name: "ipevent_receiver_ship_fenced", kind: "gauge", help: "1 when another process took this writer's database and shipping stopped.", value: |s| f64::from(u8::from(s.ship_fenced)) },
    ReceiverMetric { name: "ipevent_receiver_start_time_seconds", kind: "gauge", help: "When the receiver started, unix seconds.", value: |s| s.started_unix as f64 },
    ReceiverMetric { name: "ipevent_receiver_stats_updated_seconds", kind: "gauge", help: "When the receiver last wrote its stats, unix seconds (a stale value: it is not running).", value: |s| s.updated_unix as f64 },
];

fn render_receivers(out: &mut String, receivers: &[ReceiverStats]) {
    for metric in RECEIVER_METRICS {
        header(out, metric.name, metric.kind, metric.help);
        for stats in receivers {
            let _ = writeln!(
                out,
                "{}{{writer_id=\"{}\"}} {}",
                metric.name,
                escape(&stats.writer_id),
                (metric.value)(stats)
            );
        }
    }

    header(
        out,
        "ipevent_receiver_rejected_total",
        "counter",
        "Datagrams refused, by reason.",
    );
    for stats in receivers {
        // Every known reason, zero or not, so that rates exist before the first rejection.
        let mut by_reason: BTreeMap<&str, u64> =
            Reject::ALL.iter().map(|r| (r.name(), 0)).collect();
        for (reason, n) in &stats.rejected {
            by_reason.insert(reason, *n);
        }
        for (reason, n) in by_reason {
            let _ = writeln!(
                out,
                "ipevent_receiver_rejected_total{{writer_id=\"{}\",reason=\"{}\"}} {n}",
                escape(&stats.writer_id),
                escape(reason)
            );
        }
    }

    header(
        out,
        "ipevent_receiver_rcvbuf_bytes",
        "gauge",
        "Receive buffer the kernel granted, per socket.",
    );
    for stats in receivers {
        for (socket, bytes) in stats.rcvbuf_bytes.iter().enumerate() {
            let _ = writeln!(
                out,
                "ipevent_receiver_rcvbuf_bytes{{writer_id=\"{}\",socket=\"{socket}\"}} {bytes}",
                escape(&stats.writer_id)
            );
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value as the exposition format requires.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_counters_are_labelled_by_writer_and_reason() {
        let stats = ReceiverStats {
            writer_id: "r1".into(),
            datagrams_received: 7,
            kernel_drops: 2,
            rejected: [("truncated".to_string(), 3)].into_iter().collect(),
            rcvbuf_bytes: vec![4096],
            ..ReceiverStats::default()
        };
        let text = Metrics::default().render(&[stats], "9.9.9");
        assert!(
            text.contains("ipevent_receiver_datagrams_received_total{writer_id=\"r1\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("ipevent_receiver_kernel_drops_total{writer_id=\"r1\"} 2\n"));
        assert!(text.contains(
            "ipevent_receiver_rejected_total{writer_id=\"r1\",reason=\"truncated\"} 3\n"
        ));
        assert!(
            text.contains("ipevent_receiver_rejected_total{writer_id=\"r1\",reason=\"empty\"} 0\n")
        );
        assert!(
            text.contains("ipevent_receiver_rcvbuf_bytes{writer_id=\"r1\",socket=\"0\"} 4096\n")
        );
        assert!(text.contains("ipevent_api_build_info{version=\"9.9.9\"} 1\n"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_reset_keeps_request_counts() {
        let metrics = Metrics::default();
        metrics.request("/", "GET", 200, Duration::from_micros(100));
        metrics.request("/", "GET", 200, Duration::from_millis(3));
        metrics.request("/", "GET", 200, Duration::from_secs(60));
        metrics.post_accepted();
        metrics.post_rejected(Reject::Truncated);
        metrics.reset(true);
        let text = metrics.render(&[], "1");
        assert!(
            text.contains(
                "ipevent_api_request_duration_seconds_bucket{route=\"/\",le=\"0.0005\"} 1\n"
            ),
            "{text}"
        );
        assert!(text
            .contains("ipevent_api_request_duration_seconds_bucket{route=\"/\",le=\"0.005\"} 2\n"));
        assert!(
            text.contains("ipevent_api_request_duration_seconds_bucket{route=\"/\",le=\"10\"} 2\n")
        );
        assert!(text
            .contains("ipevent_api_request_duration_seconds_bucket{route=\"/\",le=\"+Inf\"} 3\n"));
        assert!(text
            .contains("ipevent_api_requests_total{route=\"/\",method=\"GET\",status=\"200\"} 3\n"));
        assert!(text.contains("ipevent_api_post_events_accepted_total 0\n"));
        assert!(text.contains("ipevent_api_post_events_rejected_total{reason=\"truncated\"} 0\n"));
        assert!(text.contains("ipevent_api_resets_total 1\n"));
    }

    #[test]
    fn every_counter_of_the_stats_file_is_served() {
        let stats = ReceiverStats {
            writer_id: "r1".into(),
            events_refused: 4,
            events_replayed: 5,
            journal_used_bytes: 6,
            journal_capacity_bytes: 7,
            stalled: true,
            last_stop_clean: true,
            control_conns_full: 8,
            apps_expired: 9,
            ..ReceiverStats::default()
        };
        let text = Metrics::default().render(&[stats], "1");
        for line in [
            "ipevent_receiver_events_refused_total{writer_id=\"r1\"} 4\n",
            "ipevent_receiver_events_replayed_total{writer_id=\"r1\"} 5\n",
            "ipevent_receiver_journal_used_bytes{writer_id=\"r1\"} 6\n",
            "ipevent_receiver_journal_capacity_bytes{writer_id=\"r1\"} 7\n",
            "ipevent_receiver_stalled{writer_id=\"r1\"} 1\n",
            "ipevent_receiver_last_stop_clean{writer_id=\"r1\"} 1\n",
            "ipevent_receiver_control_conns_full_total{writer_id=\"r1\"} 8\n",
            "ipevent_receiver_apps_expired_total{writer_id=\"r1\"} 9\n",
            "ipevent_api_connections_shed_total 0\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        // Every family has its HELP and TYPE once.
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(helps, types);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
