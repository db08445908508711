//! Receivers as a cluster on one bucket of a real S3 server (SeaweedFS): the real receivers,
//! the real test client spreading traffic over them, the real `ipevent-query --store`.
//!
//! Exactness never rests on UDP arriving: what a receiver accepted is in its own local tree
//! (the single-host store, exact under crashes by its journal), so the bucket must answer
//! exactly what the receivers' local trees hold together, byte for byte. When the kernel
//! dropped nothing, that is also exactly what the client sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ipevent_core::control::{self, Command as Ctl};
use ipevent_core::stats::ReceiverStats;
use ipevent_core::store::{self, AppData, DataDir};
use ipevent_core::{AppSha, Report};
use ipevent_testkit::s3::S3Server;
use ipevent_testkit::{bin, send_events, sender, stdout_json, wait_for, Receiver};
use serde_json::Value;

/// Flags that make a test cluster quick to converge: short flush, ship and stats intervals.
const FAST: [&str; 6] = [
    "--flush-interval-ms",
    "200",
    "--ship-interval-ms",
    "100",
    "--stats-interval-ms",
    "50",
];

const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// A receiver shipping to `url` on `server`.
fn receiver(
    server: &S3Server,
    url: &str,
    dir: &Path,
    writer_id: &str,
    listen: &str,
    extra: &[&str],
) -> Receiver {
    let mut args = vec!["--store", url];
    args.extend_from_slice(&FAST);
    args.extend_from_slice(extra);
    Receiver::start_as(dir, writer_id, listen, &server.env(), &args)
}

/// Asks `receiver` to drain and flush, then waits until its stats show that flush shipped to
/// the bucket and visible to readers.
fn sync_shipped(receiver: &mut Receiver) -> ReceiverStats {
    let socket = receiver.data.control_socket(&receiver.writer_id);
    let epoch = match control::request(&socket, Ctl::Sync, CONTROL_TIMEOUT).expect("sync") {
        control::Reply::Synced(synced) => synced.epoch,
        other => panic!("sync answered {other:?}"),
    };
    receiver.wait_stats("the sync's flush shipped and published", |s| {
        s.epoch >= epoch
            && s.events_pending == 0
            && s.ship_lag_epochs == 0
            && s.published_epoch == s.shipped_epoch
    })
}

/// Runs `ipevent-query` against the bucket.
fn query_store(server: &S3Server, url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("ipevent-query"));
    server.apply_env(&mut cmd);
    cmd.arg("--store")
        .arg(url)
        .args(args)
        .output()
        .expect("running ipevent-query")
}

/// What the local trees of `dirs` hold for `app`, merged: the single-host answer.
fn local_merged(dirs: &[&Path], app: &AppSha) -> Option<AppData> {
    let mut merged: BTreeMap<u32, ipevent_core::AddrStats> = BTreeMap::new();
    let mut any = false;
    for dir in dirs {
        if let Some(data) = store::read_app(&DataDir::new(*dir), app).unwrap() {
            assert!(data.torn.is_empty(), "torn log in {}", dir.display());
            any = true;
            for (ip, stats) in data.addrs {
                merged.entry(ip).or_default().merge(&stats);
            }
        }
    }
    any.then(|| AppData {
        addrs: merged.into_iter().collect(),
        ..AppData::default()
    })
}

/// Every app of the local trees of `dirs` with its total, ordered as `list` prints them.
fn local_list(dirs: &[&Path]) -> Value {
    let mut totals: BTreeMap<AppSha, u64> = BTreeMap::new();
    for dir in dirs {
        for app in store::list_apps(&DataDir::new(*dir)).unwrap() {
            *totals.entry(app.app).or_default() += app.count;
        }
    }
    let mut rows: Vec<(AppSha, u64)> = totals.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Value::Array(
        rows.into_iter()
            .map(|(app, count)| serde_json::json!({"app_sha256": app.to_hex(), "count": count}))
            .collect(),
    )
}

/// Asserts that the bucket answers, for every app of `summary` and for `list`, exactly what
/// the local trees of `dirs` hold together. Returns the bucket's reports by SHA.
fn assert_bucket_matches_local(
    server: &S3Server,
    url: &str,
    dirs: &[&Path],
    summary: &Value,
) -> BTreeMap<String, Value> {
    let mut reports = BTreeMap::new();
    for app in summary["apps"].as_array().unwrap() {
        let sha = app["sha"].as_str().unwrap();
        let parsed: AppSha = sha.parse().unwrap();
        let out = query_store(server, url, &[sha]);
        let local = local_merged(dirs, &parsed).expect("the receivers stored the app");
        let expected = Report::from_app(&local).to_json(false);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim_end(),
            expected,
            "app {sha}"
        );
        reports.insert(sha.to_string(), stdout_json(&out));
    }
    let out = query_store(server, url, &["list", "--limit", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_json(&out), local_list(dirs));
    reports
}

/// When the kernel dropped nothing, the bucket's reports are exactly what the client sent.
fn assert_reports_match_sent(reports: &BTreeMap<String, Value>, summary: &Value) {
    for app in summary["apps"].as_array().unwrap() {
        let report = &reports[app["sha"].as_str().unwrap()];
        assert_eq!(report["count"], app["count"], "{app}");
        assert_eq!(report["good_ips"], app["good"], "{app}");
        assert_eq!(report["bad_ips"], app["bad"], "{app}");
    }
}

/// A real `ipevent-api` reading the bucket, on 127.0.0.1.
struct Api {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _ready: tempfile::TempDir,
}

impl Api {
    fn start(server: &S3Server, url: &str, data_dir: &Path) -> Api {
        Api::start_with(server, url, data_dir, &[])
    }

    fn start_with(server: &S3Server, url: &str, data_dir: &Path, extra: &[&str]) -> Api {
        let ready = tempfile::tempdir().unwrap();
        let ready_file = ready.path().join("ready");
        let mut cmd = Command::new(bin("ipevent-api"));
        server.apply_env(&mut cmd);
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0", "--store", url])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning ipevent-api");
        let addr = wait_for("the API's ready file", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("ipevent-api exited ({status}) before it was ready");
            }
            std::fs::read_to_string(&ready_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        Api {
            child,
            addr,
            _ready: ready,
        }
    }
}

impl Drop for Api {
    /// SIGTERM, so that the API gives its writer id's lease in the bucket back (a killed one
    /// keeps it, and syncs would name it); SIGKILL if it outlives the wait.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = std::time::Instant::now();
        while start.elapsed() < ipevent_testkit::WAIT_LIMIT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of a GET that must answer 200.
fn http_get(url: &str) -> String {
    ureq::get(url)
        .set("Accept", "application/json")
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .into_string()
        .expect("a text body")
}

/// Runs the test client (no verification: the test checks) over `targets`.
fn client(targets: &[String], extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("ipevent-test-client"));
    cmd.arg("run");
    for target in targets {
        cmd.arg("--to").arg(target);
    }
    cmd.args(["--json", "--no-progress"])
        .args(extra)
        .env("RUST_LOG", "warn");
    cmd
}

fn run_client(targets: &[String], extra: &[&str]) -> Value {
    let out = client(targets, extra)
        .output()
        .expect("running the test client");
    assert!(
        out.status.success(),
        "test client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_json(&out)
}

/// Waits until the receivers together have seen `sent` datagrams (read or dropped by the
/// kernel); returns their stats.
fn wait_seen(receivers: &mut [&mut Receiver], sent: u64) -> Vec<ReceiverStats> {
    wait_for("the receivers to see every datagram sent", || {
        let stats: Vec<ReceiverStats> = receivers.iter().filter_map(|r| r.stats()).collect();
        let seen: u64 = stats
            .iter()
            .map(|s| s.datagrams_received + s.kernel_drops)
            .sum();
        (stats.len() == receivers.len() && seen >= sent).then_some(stats)
    })
}

#[test]
fn two_receivers_on_one_bucket_answer_as_one() {
    let server = S3Server::start();
    let url = server.store_url("cluster1");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0", &[]);
    let mut b = receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0", &[]);
    let targets = [a.addr.to_string(), b.addr.to_string()];
    let summary = run_client(
        &targets,
        &[
            "--count",
            "20000",
            "--rate",
            "20000",
            "--seed",
            "1001",
            "--batch",
            "64",
            "--corrupt-pct",
            "30",
        ],
    );
    let sent = summary["sent"].as_u64().unwrap();
    assert_eq!(sent, 20_000);
    let stats = wait_seen(&mut [&mut a, &mut b], sent);
    // Both received a share: the client spread its batches over both addresses.
    assert!(stats.iter().all(|s| s.datagrams_received > 0), "{stats:?}");
    let drops: u64 = stats.iter().map(|s| s.kernel_drops).sum();
    let accepted: u64 = [sync_shipped(&mut a), sync_shipped(&mut b)]
        .iter()
        .map(|s| s.events_accepted)
        .sum();
    let reports =
        assert_bucket_matches_local(&server, &url, &[dir_a.path(), dir_b.path()], &summary);
    if drops == 0 {
        assert_eq!(accepted, summary["valid"].as_u64().unwrap());
        assert_reports_match_sent(&reports, &summary);
    }

    // The API with --store answers the same bytes as the CLI, for both receivers' events.
    let api = Api::start(&server, &url, dir_a.path());
    for (sha, report) in &reports {
        let body = http_get(&format!("http://{}/events/{sha}", api.addr));
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            *report,
            "app {sha}"
        );
    }
    drop(api);

    // An unknown app is exit 1 naming the bucket.
    let unknown = "ab".repeat(32);
    let out = query_store(&server, &url, &[&unknown]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&url));
    a.stop();
    b.stop();
}

#[test]
fn a_receiver_killed_mid_stream_restarts_and_nothing_counts_twice() {
    let server = S3Server::start();
    let url = server.store_url("cluster2");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0", &[]);
    let mut b = receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0", &[]);
    let targets = [a.addr.to_string(), b.addr.to_string()];
    // Traffic until the test stops it (SIGINT), so the kill and the restart fall inside it.
    let sending = client(
        &targets,
        &[
            "--duration",
            "600",
            "--rate",
            "5000",
            "--seed",
            "2002",
            "--batch",
            "16",
            "--corrupt-pct",
            "30",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("starting the test client");
    a.wait_stats("receiver A to ship while traffic flows", |s| {
        s.shipped_epoch > 0 && s.datagrams_received > 0
    });
    let status = a.stop_with(libc::SIGKILL);
    assert!(!status.success());
    let restarted_at = a.addr.to_string();
    let mut a = receiver(&server, &url, dir_a.path(), "host-a", &restarted_at, &[]);
    a.wait_stats("the restarted receiver to receive traffic", |s| {
        s.datagrams_received > 0
    });
    let interrupted = Command::new("kill")
        .args(["-INT", &sending.id().to_string()])
        .status()
        .expect("running kill");
    assert!(interrupted.success());
    let out = sending
        .wait_with_output()
        .expect("the test client finishes");
    let summary = stdout_json(&out);
    sync_shipped(&mut a);
    sync_shipped(&mut b);
    assert_bucket_matches_local(&server, &url, &[dir_a.path(), dir_b.path()], &summary);
    a.stop();
    b.stop();
}

#[test]
fn a_crash_between_the_local_append_and_the_outbox_is_shipped_once_on_restart() {
    let server = S3Server::start();
    let url = server.store_url("cluster-crash");
    let dir = tempfile::tempdir().unwrap();
    // No timed flush: the one flush is the sync below, which writes two of the three apps
    // locally and then aborts, before the flush's outbox entry exists.
    let mut r = Receiver::start_as(
        dir.path(),
        "host-c",
        "127.0.0.1:0",
        &server.env(),
        &[
            "--store",
            &url,
            "--flush-interval-ms",
            "3600000",
            "--stats-interval-ms",
            "50",
            "--test-crash-after-apps",
            "2",
        ],
    );
    let targets = [r.addr.to_string()];
    let summary = run_client(
        &targets,
        &[
            "--count",
            "3000",
            "--rate",
            "20000",
            "--seed",
            "3003",
            "--corrupt-pct",
            "0",
        ],
    );
    wait_seen(&mut [&mut r], 3000);
    let socket = r.data.control_socket(&r.writer_id);
    let _ = control::request(&socket, Ctl::Sync, CONTROL_TIMEOUT);
    let status = r.wait_exit();
    assert!(!status.success());
    let outbox = dir.path().join("receivers/host-c/outbox");
    let entries: Vec<_> = std::fs::read_dir(&outbox)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "ob"))
        .collect();
    assert!(entries.is_empty(), "no outbox entry before the crash");
    let mut r = receiver(&server, &url, dir.path(), "host-c", &targets[0], &[]);
    sync_shipped(&mut r);
    assert_bucket_matches_local(&server, &url, &[dir.path()], &summary);
    r.stop();
}

#[test]
fn a_second_receiver_with_the_same_writer_id_is_refused() {
    let server = S3Server::start();
    let url = server.store_url("cluster5");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // With an address limit: the bucket gets what the local log got, refusals included.
    let mut a = receiver(
        &server,
        &url,
        dir_a.path(),
        "same",
        "127.0.0.1:0",
        &["--max-addresses-per-app", "6"],
    );
    let targets = [a.addr.to_string()];
    let first = run_client(
        &targets,
        &["--count", "2000", "--rate", "20000", "--seed", "5"],
    );
    sync_shipped(&mut a);

    let mut cmd = Command::new(bin("ipevent-receiver"));
    server.apply_env(&mut cmd);
    let out = cmd
        .args([
            "--listen",
            "127.0.0.2:0",
            "--writer-id",
            "same",
            "--allow-root",
        ])
        .arg("--data-dir")
        .arg(dir_b.path())
        .args(["--store", &url])
        .stdin(Stdio::null())
        .output()
        .expect("running a second receiver");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("writer id same is in use in the bucket")
            && stderr.contains(&dir_a.path().display().to_string()),
        "{stderr}"
    );
    // Nothing of the refused one reached the bucket, and the first goes on, exact.
    let second = run_client(
        &targets,
        &["--count", "2000", "--rate", "20000", "--seed", "6"],
    );
    let stats = sync_shipped(&mut a);
    assert_bucket_matches_local(&server, &url, &[dir_a.path()], &first);
    assert_bucket_matches_local(&server, &url, &[dir_a.path()], &second);
    if stats.kernel_drops == 0 {
        // Each app of the scenario has more than 6 addresses: the limit refused some.
        assert!(
            stats.refused.get("address_limit").copied().unwrap_or(0) > 0,
            "{stats:?}"
        );
    }
    a.stop();
}

/// The value of `metric` for `writer_id` in the API's `/metrics` text.
fn metric(text: &str, metric: &str, writer_id: &str) -> f64 {
    let prefix = format!("{metric}{{writer_id=\"{writer_id}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{prefix} missing from /metrics:\n{text}"))
        .parse()
        .expect("a number")
}

#[test]
fn an_object_store_outage_grows_the_outbox_and_the_answer_is_exact_after_it() {
    let mut server = S3Server::start();
    let url = server.store_url("cluster3");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0", &[]);
    let mut b = receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0", &[]);
    let targets = [a.addr.to_string(), b.addr.to_string()];
    let traffic = |seed: &str| {
        run_client(
            &targets,
            &[
                "--count",
                "4000",
                "--rate",
                "20000",
                "--seed",
                seed,
                "--batch",
                "16",
                "--corrupt-pct",
                "30",
            ],
        )
    };
    let before = traffic("3001");
    wait_seen(&mut [&mut a, &mut b], 4000);
    let shipped_before = [sync_shipped(&mut a), sync_shipped(&mut b)];

    // The object store goes away; both receivers keep receiving and flushing, and every flush
    // waits in their outboxes.
    server.stop();
    let during = traffic("3002");
    wait_seen(&mut [&mut a, &mut b], 8000);
    let mut accepted_during = 0;
    let receivers = [(&mut a, dir_a.path()), (&mut b, dir_b.path())];
    for ((r, dir), before) in receivers.into_iter().zip(&shipped_before) {
        let socket = r.data.control_socket(&r.writer_id);
        let epoch = match control::request(&socket, Ctl::Sync, CONTROL_TIMEOUT).expect("sync") {
            control::Reply::Synced(synced) => synced.epoch,
            other => panic!("sync answered {other:?}"),
        };
        let stats = r.wait_stats("the sync's flush, locally", |s| {
            s.epoch >= epoch && s.events_pending == 0
        });
        let accepted = stats.events_accepted - before.events_accepted;
        accepted_during += accepted;
        if accepted > 0 {
            // Whatever a receiver accepted since its last shipped flush is in its outbox: the
            // bucket cannot have taken it.
            assert!(
                stats.ship_lag_epochs >= 1 && stats.outbox_bytes > 0,
                "{stats:?}"
            );
            assert_eq!(stats.shipped_epoch, before.shipped_epoch, "{stats:?}");
            // The API on the receiver's host serves the same counters at /metrics.
            let api = Api::start(&server, &url, dir);
            let text = http_get(&format!("http://{}/metrics", api.addr));
            for (name, value) in [
                ("ipevent_receiver_ship_lag_epochs", stats.ship_lag_epochs),
                ("ipevent_receiver_outbox_bytes", stats.outbox_bytes),
            ] {
                // The API reads the stats file, rewritten since; the outbox only grows while
                // the store is down.
                assert!(metric(&text, name, &r.writer_id) >= value as f64, "{name}");
            }
        }
    }

    // The store returns: both outboxes drain, and the bucket answers exactly what the two
    // receivers hold together, before and during the outage.
    server.restart();
    let after = [sync_shipped(&mut a), sync_shipped(&mut b)];
    for stats in &after {
        assert_eq!(stats.outbox_bytes, 0, "{stats:?}");
    }
    let drops: u64 = after.iter().map(|s| s.kernel_drops).sum();
    if drops == 0 {
        assert_eq!(accepted_during, during["valid"].as_u64().unwrap());
    }
    let dirs = [dir_a.path(), dir_b.path()];
    assert_bucket_matches_local(&server, &url, &dirs, &before);
    assert_bucket_matches_local(&server, &url, &dirs, &during);
    a.stop();
    b.stop();
}

/// A receiver that flushes only when asked (a sync), shipping to `url`.
fn lazy_receiver(
    server: &S3Server,
    url: &str,
    dir: &Path,
    writer_id: &str,
    listen: &str,
) -> Receiver {
    Receiver::start_as(
        dir,
        writer_id,
        listen,
        &server.env(),
        &[
            "--store",
            url,
            "--flush-interval-ms",
            "3600000",
            "--ship-interval-ms",
            "100",
            "--stats-interval-ms",
            "50",
        ],
    )
}

#[test]
fn sync_through_the_bucket_covers_every_receiver_and_names_the_silent_ones() {
    let server = S3Server::start();
    let url = server.store_url("cluster4s");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Neither receiver flushes by itself: only the query's sync makes events reach the bucket.
    let mut a = lazy_receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0");
    let mut b = lazy_receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0");
    let targets = [a.addr.to_string(), b.addr.to_string()];
    let summary = run_client(
        &targets,
        &[
            "--count",
            "3000",
            "--rate",
            "20000",
            "--seed",
            "4001",
            "--batch",
            "16",
            "--corrupt-pct",
            "30",
        ],
    );
    let stats = wait_seen(&mut [&mut a, &mut b], 3000);
    let drops: u64 = stats.iter().map(|s| s.kernel_drops).sum();
    let dirs = [dir_a.path(), dir_b.path()];
    for app in summary["apps"].as_array().unwrap() {
        let sha = app["sha"].as_str().unwrap();
        let out = query_store(&server, &url, &["--sync", sha]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains("did not answer"), "{stderr}");
        // The sync flushed both receivers: their local trees now hold everything they
        // received, and the bucket answered the same.
        let local = local_merged(&dirs, &sha.parse().unwrap()).expect("stored locally");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim_end(),
            Report::from_app(&local).to_json(false),
            "app {sha}"
        );
        if drops == 0 {
            let report = stdout_json(&out);
            assert_eq!(report["count"], app["count"], "{app}");
            assert_eq!(report["bad_ips"], app["bad"], "{app}");
        }
    }

    // The API with --store syncs the same way before it reads.
    let more = run_client(
        &targets,
        &[
            "--count", "1000", "--rate", "20000", "--seed", "4002", "--batch", "16",
        ],
    );
    let stats = wait_seen(&mut [&mut a, &mut b], 4000);
    let drops: u64 = stats.iter().map(|s| s.kernel_drops).sum();
    let api = Api::start(&server, &url, dir_a.path());
    for app in more["apps"].as_array().unwrap() {
        let sha = app["sha"].as_str().unwrap();
        let resp = ureq::get(&format!("http://{}/events/{sha}", api.addr))
            .call()
            .expect("GET /events");
        assert_eq!(resp.header("X-Ipevent-Sync"), Some("ok"));
        let body: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
        let local = local_merged(&dirs, &sha.parse().unwrap()).expect("stored locally");
        let expected: Value =
            serde_json::from_str(&Report::from_app(&local).to_json(false)).unwrap();
        assert_eq!(body, expected, "app {sha}");
        if drops == 0 {
            assert_eq!(body["count"], app["count"], "{app}");
        }
    }
    // POST /events reaches the bucket too: the API ships it from its own outbox.
    let posted = ipevent_core::IpEvent {
        app: AppSha([0x5a; 32]),
        ip: 0x0a00_0001,
    };
    let resp = ureq::post(&format!("http://{}/events", api.addr))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&ipevent_core::wire::encode_to_vec(&posted))
        .expect("POST /events");
    assert_eq!(resp.status(), 202);
    let out = query_store(&server, &url, &["--sync", &posted.app.to_hex()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout_json(&out),
        serde_json::json!({"count": 1, "good_ips": ["10.0.0.1"], "bad_ips": []})
    );
    drop(api);

    // A receiver that died keeps its lease: a sync waits for it, then names it.
    let dir_c = tempfile::tempdir().unwrap();
    let mut c = lazy_receiver(&server, &url, dir_c.path(), "host-c", "127.0.0.3:0");
    assert!(!c.stop_with(libc::SIGKILL).success());
    let out = query_store(&server, &url, &["--sync", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("receivers host-c did not answer the sync"),
        "{stderr}"
    );
    a.stop();
    b.stop();
}

#[test]
fn a_reset_through_one_api_resets_every_receiver_on_the_bucket() {
    let server = S3Server::start();
    let url = server.store_url("cluster4r");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0", &[]);
    let mut b = receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0", &[]);
    let targets = [a.addr.to_string(), b.addr.to_string()];
    let traffic = |seed: &str, sent_before: u64, a: &mut Receiver, b: &mut Receiver| {
        let summary = run_client(
            &targets,
            &[
                "--count", "2000", "--rate", "20000", "--seed", seed, "--batch", "16",
            ],
        );
        let stats = wait_seen(&mut [a, b], sent_before + 2000);
        (summary, stats.iter().map(|s| s.kernel_drops).sum::<u64>())
    };
    let (before, _) = traffic("4101", 0, &mut a, &mut b);
    sync_shipped(&mut a);
    sync_shipped(&mut b);
    let dirs = [dir_a.path(), dir_b.path()];
    assert_bucket_matches_local(&server, &url, &dirs, &before);

    // One API host resets the cluster: both receivers follow before it answers.
    let api = Api::start(&server, &url, dir_a.path());
    let resp = ureq::delete(&format!("http://{}/events", api.addr))
        .call()
        .expect("DELETE /events");
    let body: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
    assert_eq!(body["reset"], true, "{body}");
    assert_eq!(body["generation"], 1, "{body}");
    // The receivers, and the API itself (its own writer for POST /events).
    let following: Vec<&str> = body["following"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        following.contains(&"host-a") && following.contains(&"host-b"),
        "{body}"
    );
    assert_eq!(body["not_following"], serde_json::json!([]), "{body}");
    drop(api);

    // Nothing from before is reported, by the bucket or by either host's own tree.
    for app in before["apps"].as_array().unwrap() {
        let sha = app["sha"].as_str().unwrap();
        let out = query_store(&server, &url, &[sha]);
        assert_eq!(out.status.code(), Some(1), "app {sha}");
        assert!(
            local_merged(&dirs, &sha.parse().unwrap()).is_none(),
            "app {sha}"
        );
    }
    let out = query_store(&server, &url, &["list"]);
    assert_eq!(stdout_json(&out), serde_json::json!([]));

    // Everything after it is, exactly, through --sync.
    // A reset zeroes the receivers' counters.
    let (after, drops) = traffic("4102", 0, &mut a, &mut b);
    for app in after["apps"].as_array().unwrap() {
        let sha = app["sha"].as_str().unwrap();
        let out = query_store(&server, &url, &["--sync", sha]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let local = local_merged(&dirs, &sha.parse().unwrap()).expect("stored locally");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim_end(),
            Report::from_app(&local).to_json(false),
            "app {sha}"
        );
        if drops == 0 {
            assert_eq!(stdout_json(&out)["count"], app["count"], "{app}");
        }
    }
    a.stop();
    b.stop();
}

/// The bucket's report of `app` (`--sync` first when `sync`); `None` when it has none (exit 1).
fn bucket_report(server: &S3Server, url: &str, app: &AppSha, sync: bool) -> Option<Value> {
    let sha = app.to_hex();
    let args: Vec<&str> = if sync {
        vec!["--sync", &sha]
    } else {
        vec![&sha]
    };
    let out = query_store(server, url, &args);
    match out.status.code() {
        Some(0) => Some(stdout_json(&out)),
        Some(1) => None,
        _ => panic!(
            "ipevent-query {sha}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Asserts that the bucket reports `app` exactly as the local trees of `dirs` hold it (after a
/// sync), and, when the kernel dropped nothing, with `sent` events.
fn assert_bucket_counts(server: &S3Server, url: &str, dirs: &[&Path], app: &AppSha, sent: u64) {
    let report = bucket_report(server, url, app, true).expect("the app is reported");
    let local = local_merged(dirs, app).expect("stored locally");
    assert_eq!(
        report,
        serde_json::from_str::<Value>(&Report::from_app(&local).to_json(false)).unwrap(),
        "app {app}"
    );
    let drops: u64 = dirs
        .iter()
        .flat_map(|dir| {
            DataDir::new(*dir)
                .writer_ids()
                .unwrap()
                .into_iter()
                .filter_map(move |id| {
                    let text = std::fs::read(DataDir::new(*dir).stats_path(&id)).ok()?;
                    serde_json::from_slice::<ReceiverStats>(&text).ok()
                })
        })
        .map(|s| s.kernel_drops)
        .sum();
    if drops == 0 {
        assert_eq!(report["count"], sent, "app {app}");
    }
}

/// `ipevent-query --store URL forget SHA`.
fn forget_in_bucket(server: &S3Server, url: &str, app: &AppSha) -> Output {
    query_store(server, url, &["forget", &app.to_hex()])
}

fn ips(first: u32, n: u32) -> impl Iterator<Item = u32> {
    (0..n).map(move |i| 0x0a00_0001 + first + i)
}

#[test]
fn a_forget_through_the_bucket_removes_one_app_from_every_receiver() {
    let server = S3Server::start();
    let url = server.store_url("cluster5f");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0", &[]);
    let mut b = receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0", &[]);
    let dirs = [dir_a.path(), dir_b.path()];
    let (gone, kept) = (AppSha([0x61; 32]), AppSha([0x62; 32]));
    let tx = sender();
    send_events(&tx, a.addr, &gone, ips(0, 3));
    send_events(&tx, b.addr, &gone, ips(3, 2));
    send_events(&tx, a.addr, &kept, ips(0, 2));
    send_events(&tx, b.addr, &kept, [0xb900_0001]);
    wait_seen(&mut [&mut a, &mut b], 8);
    sync_shipped(&mut a);
    sync_shipped(&mut b);
    assert_bucket_counts(&server, &url, &dirs, &gone, 5);
    let kept_before = bucket_report(&server, &url, &kept, false).expect("kept is reported");

    // Forgotten through the CLI: every receiver applied it before the answer.
    let out = forget_in_bucket(&server, &url, &gone);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = stdout_json(&out);
    assert_eq!(body["forgotten"], gone.to_hex(), "{body}");
    assert_eq!(body["found"], true, "{body}");
    assert_eq!(
        body["receivers"],
        serde_json::json!(["host-a", "host-b"]),
        "{body}"
    );
    assert_eq!(body["stopped_writers"], serde_json::json!([]), "{body}");
    // Gone from the bucket at once, and from both hosts' local trees; the other app untouched.
    assert_eq!(bucket_report(&server, &url, &gone, false), None);
    assert!(local_merged(&dirs, &gone).is_none());
    assert_eq!(
        bucket_report(&server, &url, &kept, false),
        Some(kept_before.clone())
    );
    let out = query_store(&server, &url, &["list", "--limit", "0"]);
    assert_eq!(stdout_json(&out), local_list(&dirs));
    assert_eq!(
        stdout_json(&out),
        serde_json::json!([{"app_sha256": kept.to_hex(), "count": 3}])
    );
    // Nor does the address lookup name it (both apps had 10.0.0.1).
    let out = query_store(&server, &url, &["ip", "10.0.0.1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let named: Vec<Value> = stdout_json(&out)["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["app_sha256"].clone())
        .collect();
    assert_eq!(named, [serde_json::json!(kept.to_hex())]);

    // What arrives after the forget is counted, exactly.
    send_events(&tx, a.addr, &gone, ips(20, 2));
    send_events(&tx, b.addr, &gone, ips(20, 1));
    wait_seen(&mut [&mut a, &mut b], 11);
    assert_bucket_counts(&server, &url, &dirs, &gone, 3);

    // Through the API (on host-a's data dir, beside its receiver): the same.
    let api = Api::start(&server, &url, dir_a.path());
    let resp = ureq::delete(&format!("http://{}/events/{}", api.addr, gone.to_hex()))
        .call()
        .expect("DELETE /events/:sha");
    let body: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
    assert_eq!(body["forgotten"], gone.to_hex(), "{body}");
    assert_eq!(body["found"], true, "{body}");
    let receivers: Vec<&str> = body["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        receivers.contains(&"host-a") && receivers.contains(&"host-b"),
        "{body}"
    );
    match ureq::get(&format!("http://{}/events/{}", api.addr, gone.to_hex())).call() {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("GET of a forgotten app: {other:?}"),
    }
    let kept_now: Value = serde_json::from_str(&http_get(&format!(
        "http://{}/events/{}",
        api.addr,
        kept.to_hex()
    )))
    .unwrap();
    assert_eq!(kept_now, kept_before);
    assert_eq!(bucket_report(&server, &url, &gone, false), None);
    assert!(local_merged(&dirs, &gone).is_none());

    // After it: a POST to the API and a datagram to host-b, both counted.
    let posted = ipevent_core::IpEvent {
        app: gone,
        ip: 0x0a00_0001,
    };
    let resp = ureq::post(&format!("http://{}/events", api.addr))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&ipevent_core::wire::encode_to_vec(&posted))
        .expect("POST /events");
    assert_eq!(resp.status(), 202);
    send_events(&tx, b.addr, &gone, ips(40, 1));
    wait_seen(&mut [&mut a, &mut b], 12);
    assert_bucket_counts(&server, &url, &dirs, &gone, 2);
    drop(api);
    a.stop();
    b.stop();
}

#[test]
fn a_receiver_down_during_a_forget_does_not_bring_the_app_back() {
    let server = S3Server::start();
    let url = server.store_url("cluster5d");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dirs = [dir_a.path(), dir_b.path()];
    let mut a = receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0", &[]);
    let mut b = lazy_receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0");
    let (gone, kept) = (AppSha([0x71; 32]), AppSha([0x72; 32]));
    let tx = sender();
    send_events(&tx, b.addr, &gone, ips(0, 2));
    send_events(&tx, b.addr, &kept, [0xb900_0001]);
    b.wait_stats("the first datagrams", |s| {
        s.datagrams_received + s.kernel_drops >= 3
    });
    sync_shipped(&mut b);
    // More of the app, only in host-b's journal (it flushes only when asked), when it dies.
    send_events(&tx, b.addr, &gone, ips(2, 2));
    b.wait_stats("the later datagrams journaled", |s| {
        s.events_accepted + s.kernel_drops >= 5
    });
    assert!(!b.stop_with(libc::SIGKILL).success());

    // host-b still holds its lease and cannot answer: the forget is not confirmed, and says
    // which receiver it waits for.
    let api = Api::start_with(&server, &url, dir_a.path(), &["--sync-timeout-ms", "1500"]);
    let resp = ureq::delete(&format!("http://{}/events/{}", api.addr, gone.to_hex())).call();
    match resp {
        Err(ureq::Error::Status(503, resp)) => {
            let body = resp.into_string().unwrap();
            assert!(
                body.contains("host-b") && body.contains("not confirmed"),
                "{body}"
            );
        }
        other => panic!("a forget host-b could not apply: {other:?}"),
    }
    drop(api);

    // Restarted with the app in its journal: it applies the recorded forget before it ships
    // anything, so the forget, asked again, is confirmed by both, and nothing comes back.
    let mut b = lazy_receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0");
    let out = forget_in_bucket(&server, &url, &gone);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout_json(&out)["receivers"],
        serde_json::json!(["host-a", "host-b"])
    );
    assert_eq!(bucket_report(&server, &url, &gone, true), None);
    assert!(local_merged(&dirs, &gone).is_none());
    assert_eq!(
        bucket_report(&server, &url, &kept, true).unwrap()["count"],
        1
    );

    // Stopped cleanly (its lease given back) with the app shipped: the forget changes its
    // database itself, and its next start drops the app from its local tree.
    send_events(&tx, b.addr, &gone, ips(10, 1));
    b.wait_stats("one more datagram", |s| {
        s.datagrams_received + s.kernel_drops >= 1
    });
    sync_shipped(&mut b);
    b.stop();
    assert_eq!(
        bucket_report(&server, &url, &gone, false).unwrap()["count"],
        1
    );
    let out = forget_in_bucket(&server, &url, &gone);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = stdout_json(&out);
    assert_eq!(body["receivers"], serde_json::json!(["host-a"]), "{body}");
    // The API that ran above is a stopped writer too now.
    assert!(
        body["stopped_writers"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("host-b")),
        "{body}"
    );
    assert_eq!(bucket_report(&server, &url, &gone, false), None);
    let mut b = lazy_receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0");
    // A sync is answered only once every recorded forget is applied.
    assert_eq!(bucket_report(&server, &url, &gone, true), None);
    assert!(local_merged(&dirs, &gone).is_none());

    // After all that, new events of the app count, exactly.
    send_events(&tx, a.addr, &gone, ips(30, 2));
    send_events(&tx, b.addr, &gone, ips(40, 1));
    wait_seen(&mut [&mut a, &mut b], 3);
    assert_bucket_counts(&server, &url, &dirs, &gone, 3);
    assert_eq!(
        bucket_report(&server, &url, &kept, false).unwrap()["count"],
        1
    );
    a.stop();
    b.stop();
}

#[test]
fn retention_with_the_bucket_removes_expired_apps_from_every_receiver() {
    use ipevent_core::retention::SECS_PER_DAY;
    use ipevent_store_s3::{Bucket, ShipDb};
    let server = S3Server::start();
    let url = server.store_url("cluster5r");
    let env = server.env();
    let bucket = std::sync::Arc::new(
        Bucket::from_vars(url.parse().unwrap(), |name| {
            env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
        })
        .unwrap(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let seen = |days: u64| {
        let at = u32::try_from(now - days * SECS_PER_DAY).unwrap();
        ipevent_core::AddrStats {
            count: 2,
            first_seen: at - 100,
            last_seen: at,
        }
    };
    let (old, mixed, recent, live) = (
        AppSha([0x81; 32]),
        AppSha([0x82; 32]),
        AppSha([0x83; 32]),
        AppSha([0x84; 32]),
    );
    // What both receivers shipped long ago: crafted arrival times, put into their databases
    // under their own data dirs' instance tokens before they start.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let crafted: [(&Path, &str, ipevent_store_s3::outbox::EntryApps); 2] = [
        (
            dir_a.path(),
            "host-a",
            vec![(old, vec![(1, seen(40))]), (mixed, vec![(1, seen(90))])],
        ),
        (
            dir_b.path(),
            "host-b",
            vec![
                (old, vec![(2, seen(31))]),
                (mixed, vec![(2, seen(2))]),
                (recent, vec![(3, seen(29))]),
            ],
        ),
    ];
    for (dir, writer_id, apps) in &crafted {
        let data = DataDir::new(*dir);
        data.create().unwrap();
        store::create_dir_all(&data.receiver_dir(writer_id)).unwrap();
        let token = if *writer_id == "host-a" { "a1" } else { "b2" };
        std::fs::write(data.receiver_dir(writer_id).join("instance"), token).unwrap();
        let db = ShipDb::open(std::sync::Arc::clone(&bucket), writer_id, token, "test").unwrap();
        db.apply(0, apps).unwrap();
        db.publish().unwrap();
        db.close().unwrap();
    }
    assert_eq!(
        bucket_report(&server, &url, &old, false).unwrap()["count"],
        4
    );

    let mut b = receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0", &[]);
    let mut a = receiver(
        &server,
        &url,
        dir_a.path(),
        "host-a",
        "127.0.0.1:0",
        &["--retain-days", "30"],
    );
    let tx = sender();
    send_events(&tx, a.addr, &live, [0x0a00_0001]);
    send_events(&tx, b.addr, &live, [0x0a00_0002]);
    let stats = a.wait_stats("the sweep to remove the old app", |s| s.apps_expired == 1);
    assert_eq!(stats.apps_expired, 1);
    wait_seen(&mut [&mut a, &mut b], 2);
    assert_eq!(bucket_report(&server, &url, &old, true), None);
    for (app, count) in [(mixed, 4), (recent, 2)] {
        assert_eq!(
            bucket_report(&server, &url, &app, false).unwrap()["count"],
            count,
            "{app}"
        );
    }
    let live_report = bucket_report(&server, &url, &live, true).expect("the live app");
    let local = local_merged(&[dir_a.path(), dir_b.path()], &live).unwrap();
    assert_eq!(live_report["count"], local.count());
    let out = query_store(&server, &url, &["list", "--limit", "0"]);
    let listed: Vec<String> = stdout_json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["app_sha256"].as_str().unwrap().to_string())
        .collect();
    assert!(!listed.contains(&old.to_hex()), "{listed:?}");
    assert!(listed.contains(&mixed.to_hex()) && listed.contains(&live.to_hex()));
    a.stop();
    b.stop();
}
