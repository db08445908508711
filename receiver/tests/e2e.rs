//! The real receiver binary on 127.0.0.1, real datagrams, real files, and the real
//! `ipevent-query` reading what it wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ipevent_core::control;
use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use ipevent_testkit::{bin, sender, stdout_json, PacedSender, Receiver, Rng};

/// One app's traffic: the hosts of its /28 it talks to, and outsiders.
struct AppPlan {
    app: AppSha,
    hosts: Vec<u32>,
    outsiders: Vec<u32>,
}

impl AppPlan {
    fn random(rng: &mut Rng) -> AppPlan {
        let block = (rng.next_u64() as u32) & !0xf;
        let hosts = (1..=14).map(|h| block + h).collect();
        let mut outsiders = BTreeSet::new();
        while outsiders.len() < 1 + rng.below(10) as usize {
            let ip = rng.next_u64() as u32;
            if ip & !0xf != block {
                outsiders.insert(ip);
            }
        }
        AppPlan {
            app: rng.app(),
            hosts,
            outsiders: outsiders.into_iter().collect(),
        }
    }

    fn all(&self) -> Vec<u32> {
        self.hosts.iter().chain(&self.outsiders).copied().collect()
    }

    /// The report contract 2 demands when every address was sent at least once.
    fn expected_json(&self, count: u64) -> String {
        let dotted = |ips: &[u32]| -> Vec<String> {
            ips.iter()
                .map(|ip| Ipv4Addr::from(*ip).to_string())
                .collect()
        };
        let mut good = self.hosts.clone();
        good.sort_unstable();
        let mut bad = self.outsiders.clone();
        bad.sort_unstable();
        // Written out by hand: the key order is part of the contract.
        format!(
            "{{\"count\":{count},\"good_ips\":{},\"bad_ips\":{}}}",
            serde_json::to_string(&dotted(&good)).unwrap(),
            serde_json::to_string(&dotted(&bad)).unwrap()
        )
    }
}

fn event(app: AppSha, ip: u32) -> Vec<u8> {
    wire::encode_to_vec(&IpEvent { app, ip })
}

/// A datagram broken in one of several ways, never a valid event.
fn corrupted(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    loop {
        let mut bytes = valid.to_vec();
        match rng.below(6) {
            0 => {
                let len = 1 + rng.below(100) as usize;
                bytes = (0..len).map(|_| rng.next_u64() as u8).collect();
            }
            1 => bytes.truncate(rng.below(valid.len() as u64) as usize),
            2 => {
                let at = 2 + rng.below(64) as usize;
                bytes[at] = [b'g', b'/', 0, b'.', b' '][rng.below(5) as usize];
            }
            3 => {
                bytes.truncate(2 + 64);
                bytes.push(0x10);
                let mut ip = (1u64 << 32) + rng.below(1 << 40);
                while ip >= 0x80 {
                    bytes.push((ip as u8) | 0x80);
                    ip >>= 7;
                }
                bytes.push(ip as u8);
            }
            4 => bytes.resize(1025 + rng.below(2000) as usize, b'x'),
            _ => bytes.truncate(2 + 64),
        }
        if wire::decode(&bytes).is_err() {
            return bytes;
        }
    }
}

fn send(socket: &UdpSocket, to: SocketAddr, datagram: &[u8]) {
    socket.send_to(datagram, to).expect("sending a datagram");
}

fn query_ok(rx: &Receiver, args: &[&str]) -> String {
    let out = rx.query(args);
    assert!(
        out.status.success(),
        "ipevent-query {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

/// Longest datagram [`event`] and [`corrupted`] make.
const DATAGRAM_MAX_BYTES: usize = 3100;

/// Stats often, so that a [`PacedSender`] waits little between windows.
const FAST_STATS: &[&str] = &["--stats-interval-ms", "10"];

#[test]
fn three_apps_with_thirty_percent_corruption_are_reported_exactly() {
    let mut rx = Receiver::start(FAST_STATS);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    let mut rng = Rng::new(0x1e57);
    let plans: Vec<AppPlan> = (0..3).map(|_| AppPlan::random(&mut rng)).collect();
    let mut counts = vec![0u64; 3];
    let mut corrupt = 0u64;
    let mut sent = 0u64;
    // Every address at least once, then random picks.
    for (i, plan) in plans.iter().enumerate() {
        for ip in plan.all() {
            tx.send(&event(plan.app, ip));
            counts[i] += 1;
            sent += 1;
        }
    }
    for _ in 0..6000 {
        let i = rng.below(3) as usize;
        let all = plans[i].all();
        let datagram = event(plans[i].app, all[rng.below(all.len() as u64) as usize]);
        if rng.below(100) < 30 {
            tx.send(&corrupted(&mut rng, &datagram));
            corrupt += 1;
        } else {
            tx.send(&datagram);
            counts[i] += 1;
        }
        sent += 1;
    }
    tx.wait_read();
    rx.stop();
    let stats = rx.stats().unwrap();
    assert_eq!(stats.kernel_drops, 0);
    assert_eq!(stats.datagrams_received, sent);
    assert_eq!(stats.rejected_total, corrupt);
    assert_eq!(stats.events_accepted, counts.iter().sum::<u64>());
    assert_eq!(
        stats.events_flushed, stats.events_accepted,
        "everything accepted reached the store"
    );
    for (plan, count) in plans.iter().zip(&counts) {
        let got = query_ok(&rx, &[&plan.app.to_hex()]);
        assert_eq!(got, plan.expected_json(*count), "app {}", plan.app);
    }
}

#[test]
fn sync_makes_events_visible_without_waiting_for_a_flush() {
    let mut rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    let mut rng = Rng::new(7);
    let plan = AppPlan::random(&mut rng);
    let sha = plan.app.to_hex();
    let all = plan.all();
    for ip in &all {
        tx.send(&event(plan.app, *ip));
    }
    // Nothing is flushed yet: without --sync the app is unknown.
    let before = rx.query(&[&sha]);
    assert_eq!(
        before.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&before.stdout)
    );
    assert_eq!(
        query_ok(&rx, &["--sync", &sha]),
        plan.expected_json(all.len() as u64)
    );
    // And again, for events sent after the first sync.
    for ip in &all {
        tx.send(&event(plan.app, *ip));
    }
    assert_eq!(
        query_ok(&rx, &["--sync", &sha]),
        plan.expected_json(2 * all.len() as u64)
    );
    assert_eq!(rx.stats().map(|s| s.kernel_drops), Some(0));
    rx.stop();
}

/// Every path the layout allows, relative to the data dir.
fn allowed(relative: &Path) -> bool {
    let parts: Vec<&str> = relative.iter().map(|p| p.to_str().unwrap()).collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    match parts.as_slice() {
        ["LAYOUT"] | ["events"] | ["receivers"] | ["receivers", "test"] => true,
        ["receivers", "test", file] => [
            "lock",
            "control.sock",
            "stats.json",
            "state.json",
            "journal",
        ]
        .contains(file),
        ["events", "index"] | ["events", "index", "test.idx"] => true,
        ["events", "addr"] | ["events", "addr", "test"] => true,
        ["events", "addr", "test", run] => run
            .strip_suffix(".run")
            .is_some_and(|seq| seq.len() == 20 && seq.bytes().all(|b| b.is_ascii_digit())),
        ["events", fan] => hex(fan, 2),
        ["events", fan, app] => hex(fan, 2) && hex(app, 64) && app.starts_with(fan),
        ["events", fan, app, "test.log"] => hex(fan, 2) && hex(app, 64) && app.starts_with(fan),
        _ => false,
    }
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        out.push(path.clone());
        if path.symlink_metadata().unwrap().is_dir() {
            walk(&path, out);
        }
    }
}

#[test]
fn hostile_names_never_reach_the_file_system() {
    let outer = tempfile::tempdir().unwrap();
    let data_dir = outer.path().join("data");
    let mut rx = Receiver::start_in(&data_dir, FAST_STATS);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    let names: [&[u8]; 8] = [
        b"../../../../../../../../../../../../../../../../../../../../etc/",
        b"a3f1c0de0000000000000000000000/000000000000000000000000000000001",
        b"a3f1c0de0000000000000000000000\x00000000000000000000000000000000001",
        b"..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..\\..",
        b"/tmp/ipevent-escape/00000000000000000000000000000000000000000000",
        b"a3f1c0de00000000000000000000000000000000000000000000000000000001/..",
        b"..",
        b"",
    ];
    for name in names {
        let mut datagram = vec![0x0a, name.len() as u8];
        datagram.extend_from_slice(name);
        datagram.extend_from_slice(&[0x10, 0x01]);
        assert!(wire::decode(&datagram).is_err());
        tx.send(&datagram);
    }
    // One valid event, so a sync proves the hostile ones were all read and refused.
    let good = AppSha([0xab; 32]);
    tx.send(&event(good, 1));
    let stats = tx.wait_read();
    assert_eq!(stats.rejected["sha_format"], names.len() as u64);
    query_ok(&rx, &["--sync", &good.to_hex()]);
    rx.stop();

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o750,
        "the data dir is private to the service's user and group"
    );
    let mut paths = Vec::new();
    walk(outer.path(), &mut paths);
    for path in &paths {
        let relative = path.strip_prefix(&data_dir).unwrap_or_else(|_| {
            assert_eq!(path, &data_dir, "something was created beside the data dir");
            Path::new("")
        });
        if relative.as_os_str().is_empty() {
            continue;
        }
        assert!(
            allowed(relative),
            "{} is not part of the layout",
            path.display()
        );
    }
    assert!(!Path::new("/tmp/ipevent-escape").exists());
}

#[test]
fn queries_in_a_loop_never_fail_or_miscount_while_the_receiver_writes() {
    let mut rx = Receiver::start(&["--flush-interval-ms", "5", "--stats-interval-ms", "10"]);
    let mut rng = Rng::new(99);
    let plan = AppPlan::random(&mut rng);
    let sha = plan.app.to_hex();
    let total = 20_000u64;
    let done = Arc::new(AtomicBool::new(false));
    let sender_thread = {
        let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
        let (app, all, done) = (plan.app, plan.all(), done.clone());
        std::thread::spawn(move || {
            for i in 0..total {
                tx.send(&event(app, all[i as usize % all.len()]));
            }
            done.store(true, Ordering::SeqCst);
            tx
        })
    };
    let mut last = 0u64;
    let mut reads = 0;
    while !done.load(Ordering::SeqCst) || reads < 20 {
        let out = rx.query(&[&sha]);
        match out.status.code() {
            // Before the first flush the app does not exist yet.
            Some(1) => assert_eq!(last, 0, "the app vanished after count {last}"),
            Some(0) => {
                let report = stdout_json(&out);
                let count = report["count"].as_u64().unwrap();
                assert!(
                    count >= last && count <= total,
                    "count went from {last} to {count}"
                );
                let listed = report["good_ips"].as_array().unwrap().len()
                    + report["bad_ips"].as_array().unwrap().len();
                assert!(listed <= plan.all().len());
                last = count;
            }
            other => panic!(
                "query failed with {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
        reads += 1;
    }
    sender_thread.join().unwrap().wait_read();
    assert_eq!(query_ok(&rx, &["--sync", &sha]), plan.expected_json(total));
    rx.stop();
}

#[test]
fn restarts_add_up_and_an_unclean_stop_is_noticed() {
    let mut rng = Rng::new(3);
    let plan = AppPlan::random(&mut rng);
    let sha = plan.app.to_hex();
    let tx = sender();
    let mut rx = Receiver::start(&[]);
    let dir = rx.take_tmp().unwrap();
    for ip in plan.all() {
        send(&tx, rx.addr, &event(plan.app, ip));
    }
    query_ok(&rx, &["--sync", &sha]);
    rx.stop();
    assert!(rx.stats().unwrap().last_stop_clean);

    let mut rx = Receiver::start_in(dir.path(), &[]);
    assert!(
        rx.stats().unwrap().last_stop_clean,
        "a clean stop was taken for a crash"
    );
    for ip in plan.all() {
        send(&tx, rx.addr, &event(plan.app, ip));
    }
    assert_eq!(
        query_ok(&rx, &["--sync", &sha]),
        plan.expected_json(2 * plan.all().len() as u64)
    );
    let status = rx.stop_with(libc::SIGKILL);
    assert!(!status.success());

    let mut rx = Receiver::start_in(dir.path(), &[]);
    assert!(
        !rx.stats().unwrap().last_stop_clean,
        "a SIGKILL went unnoticed"
    );
    assert_eq!(
        query_ok(&rx, &[&sha]),
        plan.expected_json(2 * plan.all().len() as u64)
    );
    rx.stop();
}

#[test]
fn sigint_also_flushes_everything() {
    let mut rx = Receiver::start(&["--flush-interval-ms", "60000", "--stats-interval-ms", "10"]);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    let app = AppSha([0x11; 32]);
    for i in 0..500u32 {
        tx.send(&event(app, 0x0a00_0001 + (i % 14)));
    }
    tx.wait_read();
    let status = rx.stop_with(libc::SIGINT);
    assert!(status.success(), "{status}");
    let report = stdout_json(&rx.query(&[&app.to_hex()]));
    assert_eq!(report["count"], 500);
}

#[test]
fn control_channel_answers_ping_and_refuses_nonsense() {
    let rx = Receiver::start(&[]);
    let socket = rx.data.control_socket(&rx.writer_id);
    let pong = control::ping(&socket, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(pong.writer_id, "test");
    assert_eq!(pong.pid, rx.pid());

    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    (&stream).write_all(b"format-disk\n").unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert!(line.starts_with("err unknown request"), "{line}");

    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    (&stream).write_all(&[b'x'; 200]).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert!(line.starts_with("err request line too long"), "{line}");
}

/// Runs the receiver with `args` and returns its exit code and stderr.
fn run_failing(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin("ipevent-receiver"))
        .arg("--allow-root")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_line(stderr: &str) -> &str {
    stderr.lines().last().unwrap_or("")
}

#[test]
fn bad_settings_get_one_clear_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();

    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_failing(&["--listen", &addr, "--data-dir", data, "--writer-id", "x"]);
    assert_eq!(code, Some(1));
    let line = last_line(&stderr);
    assert!(
        line.contains(&format!("binding UDP {addr}")) && line.to_lowercase().contains("in use"),
        "{stderr}"
    );

    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"").unwrap();
    let (code, stderr) = run_failing(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(
        last_line(&stderr).contains("preparing data dir"),
        "{stderr}"
    );

    let (code, stderr) = run_failing(&["--flush-interval-ms", "soon"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stderr) = run_failing(&["--listen", "nowhere"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stderr) = run_failing(&["--writer-id", "../x", "--data-dir", data]);
    assert_eq!(code, Some(1));
    assert!(last_line(&stderr).contains("writer id"), "{stderr}");

    let running = Receiver::start_in(dir.path(), &[]);
    let (code, stderr) = run_failing(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--writer-id",
        "test",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        last_line(&stderr).contains("is in use by another process"),
        "{stderr}"
    );
    drop(running);
}

#[test]
fn several_ingest_threads_share_the_port_and_sync_drains_them_all() {
    let mut rx = Receiver::start(&["--threads", "3", "--flush-interval-ms", "60000"]);
    let mut paced = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    let mut rng = Rng::new(11);
    let plan = AppPlan::random(&mut rng);
    // Several source ports, so the kernel spreads the flows over the sockets.
    for _ in 0..8 {
        let tx = sender();
        for ip in plan.all() {
            paced.send_from(&tx, &event(plan.app, ip));
        }
    }
    assert_eq!(
        query_ok(&rx, &["--sync", &plan.app.to_hex()]),
        plan.expected_json(paced.sent())
    );
    paced.wait_read();
    rx.stop();
}

#[test]
fn every_reject_reason_is_counted() {
    let mut rx = Receiver::start(FAST_STATS);
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    let mut valid = 0;
    let list = ipevent_core::testdata::wire_vectors().unwrap();
    let longest = list.iter().map(|v| v.bytes.len()).max().unwrap();
    let mut tx = PacedSender::new(&rx, longest);
    for v in &list {
        tx.send(&v.bytes);
        match &v.verdict {
            Err(reason) => *want.entry(reason.clone()).or_default() += 1,
            Ok(_) => valid += 1,
        }
    }
    let stats = tx.wait_read();
    assert_eq!(stats.events_accepted, valid);
    for (reason, n) in want {
        assert_eq!(stats.rejected[&reason], n, "reason {reason}");
    }
    rx.stop();
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

#[test]
fn root_is_refused_with_refuse_root() {
    if !running_as_root() {
        eprintln!("skipped: the tests do not run as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("ipevent-receiver"))
        .args(["--listen", "127.0.0.1:0", "--refuse-root", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        last_line(&stderr).contains("refusing to run as root"),
        "{stderr}"
    );
    assert!(!dir.path().join("events").exists(), "nothing was created");
}

#[test]
fn the_data_dir_is_private_and_planted_links_are_not_followed() {
    let outer = tempfile::tempdir().unwrap();
    let data_dir = outer.path().join("data");
    let target = outer.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    // A link planted where an app's fan-out directory would go.
    let app = AppSha([0xcd; 32]);
    let other = AppSha([0xce; 32]);
    std::fs::create_dir_all(data_dir.join("events")).unwrap();
    std::os::unix::fs::symlink(&target, data_dir.join("events").join("cd")).unwrap();

    let mut rx = Receiver::start_in(&data_dir, &[]);
    let tx = sender();
    send(&tx, rx.addr, &event(app, 1));
    send(&tx, rx.addr, &event(other, 1));
    let out = rx.query(&["--sync", &other.to_hex()]);
    assert!(out.status.success());
    rx.stop();
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "nothing was written through the link"
    );
    let stats = rx.stats().unwrap();
    assert_eq!(stats.events_flushed, 1);
    assert_eq!(
        stats.events_refused, 1,
        "the app behind the link is refused, and counted"
    );
}

#[test]
fn max_apps_and_low_disk_stop_new_apps_and_count_their_events() {
    let mut rx = Receiver::start(&["--max-apps", "3", "--flush-interval-ms", "60000"]);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    let apps: Vec<AppSha> = (1..=5u8).map(|i| AppSha([i; 32])).collect();
    for app in &apps {
        tx.send(&event(*app, 1));
        tx.send(&event(*app, 2));
    }
    tx.wait_read();
    query_ok(&rx, &["--sync", "list"]);
    let stats = rx.stats().unwrap();
    assert_eq!(stats.events_flushed, 6);
    assert_eq!(stats.events_refused, 4);
    // Known apps keep receiving.
    tx.send(&event(apps[0], 3));
    let stored: Vec<serde_json::Value> =
        serde_json::from_str(&query_ok(&rx, &["--sync", "list"])).unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(
        stored
            .iter()
            .map(|a| a["count"].as_u64().unwrap())
            .sum::<u64>(),
        7
    );
    rx.stop();

    // No free space is enough for a threshold of u64::MAX: no new app at all.
    let mut rx = Receiver::start(&["--min-free-bytes", &u64::MAX.to_string()]);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    tx.send(&event(apps[0], 1));
    tx.wait_read();
    query_ok(&rx, &["--sync", "list"]);
    assert_eq!(rx.stats().unwrap().events_refused, 1);
    rx.stop();
}
