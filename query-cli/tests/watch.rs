//! `ipevent-query watch`: the real receiver and the real CLI, lines read from its stdout.
//!
//! Every event is delivered before anything is asserted: it is sent, the receivers are
//! synced (which flushes), and the receiver's counters must show it accepted, or it is sent
//! again. Lines are awaited as they come; nothing waits on a fixed time.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipevent_core::store::{AppendBlocks, StoreWriter};
use ipevent_core::wire::{self, IpEvent};
use ipevent_core::{AddrStats, AppSha, DataDir};
use ipevent_testkit::{bin, query, sender, Receiver, WAIT_LIMIT};
use serde_json::Value;

/// 2001-09-09T01:46:40Z: when the crafted history happened.
const LONG_AGO: u32 = 1_000_000_000;

fn ip(text: &str) -> u32 {
    u32::from(text.parse::<Ipv4Addr>().unwrap())
}

/// Writes `addrs` of `app` into the store as writer `seed`, first seen [`LONG_AGO`].
fn seed_history(data: &DataDir, app: AppSha, addrs: &[&str]) {
    let _lock = data.lock_writer("seed").unwrap();
    let mut writer = StoreWriter::new(data.clone(), "seed", false).unwrap();
    let mut records: Vec<(u32, AddrStats)> = addrs
        .iter()
        .map(|a| {
            let stats = AddrStats {
                count: 1,
                first_seen: LONG_AGO,
                last_seen: LONG_AGO,
            };
            (ip(a), stats)
        })
        .collect();
    records.sort_by_key(|(ip, _)| *ip);
    writer.append(&app, 1, &records).unwrap();
}

fn send_once(rx: &Receiver, app: AppSha, addr: &str) {
    let datagram = wire::encode_to_vec(&IpEvent { app, ip: ip(addr) });
    sender().send_to(&datagram, rx.addr).unwrap();
}

fn accepted(rx: &Receiver) -> u64 {
    rx.stats().map_or(0, |s| s.events_accepted)
}

/// Sends one event to `rx` and syncs every receiver (a flush), until `rx`'s counters show
/// it accepted: a datagram the kernel dropped is sent again.
fn deliver(rx: &Receiver, app: AppSha, addr: &str) {
    let data = &rx.data;
    ipevent_core::control::sync_all(data, WAIT_LIMIT).unwrap();
    let before = accepted(rx);
    for _ in 0..100 {
        send_once(rx, app, addr);
        let synced = ipevent_core::control::sync_all(data, WAIT_LIMIT).unwrap();
        assert!(synced.failed.is_empty(), "{:?}", synced.failed);
        if accepted(rx) > before {
            return;
        }
    }
    panic!("{addr} never reached the receiver");
}

/// Sends one event to `rx` without a flush, until its counters show it accepted (in the
/// journal, not yet in the logs).
fn deliver_unflushed(rx: &Receiver, app: AppSha, addr: &str) {
    let before = accepted(rx);
    for _ in 0..100 {
        send_once(rx, app, addr);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if accepted(rx) > before {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(5));
        }
    }
    panic!("{addr} never reached the receiver");
}

/// A running `ipevent-query watch`, its stdout and stderr read line by line.
struct Watch {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Watch {
    /// Starts the watch on `dir` and waits until it says it is watching.
    fn start(dir: &Path, extra: &[&str]) -> Watch {
        let mut child = Command::new(bin("ipevent-query"))
            .arg("--data-dir")
            .arg(dir)
            .arg("watch")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ipevent-query watch");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        let watch = Watch {
            child,
            stdout,
            stderr,
        };
        let said = watch
            .stderr
            .recv_timeout(WAIT_LIMIT)
            .expect("the watch to say it is watching");
        assert!(said.contains("watching"), "{said}");
        watch
    }

    /// The next line on stdout, as JSON.
    fn next(&self) -> Value {
        let line = self.next_raw();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    /// The next line on stdout, as printed.
    fn next_raw(&self) -> String {
        self.stdout
            .recv_timeout(WAIT_LIMIT)
            .expect("a line from the watch")
    }

    /// Sends `signal` and returns the exit code, with what is left on stdout and stderr.
    fn stop(mut self, signal: &str) -> (Option<i32>, Vec<String>, Vec<String>) {
        let killed = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(killed.success());
        let status = self.child.wait().unwrap();
        let rest = |rx: &mpsc::Receiver<String>| rx.iter().collect::<Vec<_>>();
        (status.code(), rest(&self.stdout), rest(&self.stderr))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn assert_line(line: &Value, event: &str, app: AppSha, addr: &str) {
    assert_eq!(line["event"], event, "{line}");
    assert_eq!(line["app_sha256"], app.to_hex(), "{line}");
    assert_eq!(line["ip"], addr, "{line}");
}

#[test]
fn new_bad_addresses_and_netblock_changes_each_print_one_line_from_every_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    data.create().unwrap();
    let (a, b) = (AppSha([0xa1; 32]), AppSha([0xb2; 32]));
    // Long ago: two hosts of 10.0.0.0/28 (good) and an outsider (bad, but old news).
    seed_history(&data, a, &["10.0.0.1", "10.0.0.2", "7.7.7.7"]);
    let rx = Receiver::start_in(dir.path(), &["--flush-interval-ms", "60000"]);
    let watch = Watch::start(dir.path(), &[]);

    deliver(&rx, a, "8.8.8.8");
    let raw = watch.next_raw();
    let line: Value = serde_json::from_str(&raw).unwrap();
    assert_line(&line, "bad_address", a, "8.8.8.8");
    assert_eq!(line["count"], 1);
    assert_eq!(line["netblock"], "10.0.0.0/28");
    assert_eq!(line["previous_netblock"], "10.0.0.0/28");
    assert!(
        line["first_seen"].as_str().unwrap().ends_with('Z'),
        "{line}"
    );
    assert!(line["last_seen"].as_str().unwrap().ends_with('Z'), "{line}");
    // The keys, in the documented order.
    let keys = [
        "event",
        "app_sha256",
        "ip",
        "count",
        "first_seen",
        "last_seen",
        "netblock",
        "previous_netblock",
    ];
    let at: Vec<usize> = keys
        .iter()
        .map(|key| {
            raw.find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key}: {raw}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{raw}");
    assert_eq!(line.as_object().unwrap().len(), keys.len(), "{raw}");

    // Two hosts of 192.168.1.0/28: bad while 10.0.0.0/28 wins (the tie goes to the lower
    // block); the third moves the netblock, and the old hosts turn bad.
    deliver(&rx, a, "192.168.1.1");
    assert_line(&watch.next(), "bad_address", a, "192.168.1.1");
    deliver(&rx, a, "192.168.1.2");
    assert_line(&watch.next(), "bad_address", a, "192.168.1.2");
    deliver(&rx, a, "192.168.1.3");
    for old in ["10.0.0.1", "10.0.0.2"] {
        let line = watch.next();
        assert_line(&line, "netblock_changed", a, old);
        assert_eq!(line["netblock"], "192.168.1.0/28");
        assert_eq!(line["previous_netblock"], "10.0.0.0/28");
        assert_eq!(line["first_seen"], "2001-09-09T01:46:40Z");
    }

    // Known addresses print nothing; a second receiver's flushes are followed too.
    deliver(&rx, a, "8.8.8.8");
    let other = Receiver::start_as(
        dir.path(),
        "other",
        "127.0.0.1:0",
        &[],
        &["--flush-interval-ms", "60000"],
    );
    deliver(&other, b, "10.9.9.1");
    deliver(&other, b, "10.9.9.2");
    deliver(&other, b, "9.9.9.9");
    let line = watch.next();
    assert_line(&line, "bad_address", b, "9.9.9.9");
    assert_eq!(line["netblock"], "10.9.9.0/28");

    let (code, rest, _) = watch.stop("INT");
    assert_eq!(code, Some(0));
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn since_reports_what_the_store_holds_from_then_on_before_following() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    data.create().unwrap();
    let a = AppSha([0xa2; 32]);
    seed_history(&data, a, &["10.0.0.1", "10.0.0.2", "7.7.7.7"]);
    let rx = Receiver::start_in(dir.path(), &["--flush-interval-ms", "60000"]);
    deliver(&rx, a, "6.6.6.6");

    // From 2001 on: the old outsider, then the new one (by first arrival).
    let watch = Watch::start(dir.path(), &["--since", "2001-01-01T00:00:00Z"]);
    assert_line(&watch.next(), "bad_address", a, "7.7.7.7");
    assert_line(&watch.next(), "bad_address", a, "6.6.6.6");
    deliver(&rx, a, "5.5.5.5");
    assert_line(&watch.next(), "bad_address", a, "5.5.5.5");
    let (code, rest, _) = watch.stop("TERM");
    assert_eq!(code, Some(0));
    assert!(rest.is_empty(), "{rest:?}");

    // A duration ago: only what is newer than the history (the receiver's events, which
    // may share their second: by first arrival, then by address).
    let watch = Watch::start(dir.path(), &["--since", "1h"]);
    let mut lines = [watch.next(), watch.next()];
    lines.sort_by_key(|line| line["ip"].as_str().map(ip));
    assert_line(&lines[0], "bad_address", a, "5.5.5.5");
    assert_line(&lines[1], "bad_address", a, "6.6.6.6");
    let (code, rest, _) = watch.stop("TERM");
    assert_eq!(code, Some(0));
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn receiver_restarts_neither_repeat_nor_lose_lines() {
    let dir = tempfile::tempdir().unwrap();
    let a = AppSha([0xa3; 32]);
    let args = ["--flush-interval-ms", "60000", "--stats-interval-ms", "20"];
    let mut rx = Receiver::start_in(dir.path(), &args);
    deliver(&rx, a, "10.0.0.1");
    deliver(&rx, a, "10.0.0.2");
    let watch = Watch::start(dir.path(), &[]);
    deliver(&rx, a, "8.8.8.8");
    assert_line(&watch.next(), "bad_address", a, "8.8.8.8");

    // A clean restart rewrites the writer's app index; nothing is repeated.
    rx.stop();
    let mut rx = Receiver::start_in(dir.path(), &args);
    deliver(&rx, a, "8.8.8.8");
    deliver(&rx, a, "1.1.1.1");
    assert_line(&watch.next(), "bad_address", a, "1.1.1.1");

    // A crash: the event is in the journal only; the next start replays and flushes it.
    deliver_unflushed(&rx, a, "2.2.2.2");
    rx.stop_with(9);
    let rx = Receiver::start_in(dir.path(), &args);
    deliver(&rx, a, "3.3.3.3");
    assert_line(&watch.next(), "bad_address", a, "2.2.2.2");
    assert_line(&watch.next(), "bad_address", a, "3.3.3.3");

    let (code, rest, _) = watch.stop("TERM");
    assert_eq!(code, Some(0));
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn a_bad_since_or_store_is_a_one_line_error_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["watch", "--since", "yesterday"][..],
        &["watch", "--since", "2001-13-01T00:00:00Z"],
        &["watch", "--since", ""],
        &["--store", "s3://UP/prefix", "watch"],
    ] {
        let out = query(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}
