//! The API with a real receiver: read-after-write, resets in the middle of traffic, POST
//! beside UDP, and many concurrent reads while the receiver ingests at full speed.
//!
//! The receiver flushes only every 60 s here, so every read below that sees an event saw it
//! because the API asked the receiver to drain and flush first (contract 4).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{app, datagram, http, metric, report_json, send_events, vectors, Api, ApiHttp};
use ipevent_core::wire::AppSha;
use ipevent_testkit::{sender, wait_for, Receiver};

/// Flush interval long enough that no test here relies on a timed flush.
const SLOW_FLUSH: [&str; 2] = ["--flush-interval-ms", "60000"];
/// Stats every 20 ms so waits on receiver counters are short.
const FAST_STATS: [&str; 2] = ["--stats-interval-ms", "20"];

/// Syncs and requests may take long on a loaded machine; only a receiver that never answers
/// may fail a sync here.
const PATIENT_API: [&str; 4] = [
    "--sync-timeout-ms",
    "60000",
    "--request-timeout-ms",
    "120000",
];

fn start() -> (Receiver, Api) {
    let receiver = Receiver::start(&[SLOW_FLUSH[0], SLOW_FLUSH[1], FAST_STATS[0], FAST_STATS[1]]);
    let api = Api::start(receiver.data.root(), &PATIENT_API);
    (receiver, api)
}

#[test]
fn reference_flow_reset_udp_with_corrupted_datagrams_then_exact_report() {
    let (mut receiver, api) = start();
    let done = api.reset();
    assert_eq!(
        done,
        serde_json::json!({ "reset": true, "receivers": ["test"] })
    );

    let socket = sender();
    let (a, b) = (app(0xa1), app(0xb2));
    let good_events = [
        (a, "10.1.2.1"),
        (a, "10.1.2.1"),
        (a, "10.1.2.14"),
        (a, "10.1.2.7"),
        (a, "10.1.2.0"),  // network address of the chosen /28: bad
        (a, "10.1.2.15"), // broadcast address: bad
        (a, "10.1.2.17"), // next /28
        (a, "8.8.8.8"),
        (a, "8.8.8.8"),
        (b, "192.168.0.33"),
    ];
    send_events(&socket, receiver.addr, &good_events);
    // Every invalid datagram of the shared vectors, and a few more kinds of damage.
    let mut rejected = 0u64;
    for vector in vectors() {
        if vector.verdict.is_err() {
            socket.send_to(&vector.bytes, receiver.addr).unwrap();
            rejected += 1;
        }
    }
    let whole = datagram(&a, "10.1.2.2");
    for damaged in [
        &whole[..whole.len() - 1],
        &whole[..10],
        &[0xff; 40][..],
        &vec![0x0a; 1500][..],
    ] {
        socket.send_to(damaged, receiver.addr).unwrap();
        rejected += 1;
    }

    let reply = api.get(&format!("/events/{a}"));
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-ipevent-sync"), Some("ok"));
    assert_eq!(
        reply.body,
        report_json(
            9,
            &["10.1.2.1", "10.1.2.7", "10.1.2.14"],
            &["8.8.8.8", "10.1.2.0", "10.1.2.15", "10.1.2.17"]
        )
    );
    assert_eq!(api.report(&b), report_json(1, &["192.168.0.33"], &[]));
    // The CLI reads the same store and agrees.
    let cli = receiver.query(&[&a.to_string()]);
    assert_eq!(String::from_utf8_lossy(&cli.stdout).trim(), api.report(&a));

    let accepted = good_events.len() as u64;
    let stats = receiver.wait_stats("every datagram counted", |s| {
        s.events_accepted == accepted && s.rejected_total == rejected
    });
    assert_eq!(
        stats.kernel_drops, 0,
        "the kernel dropped {} datagrams",
        stats.kernel_drops
    );
    assert_eq!(stats.datagrams_received, accepted + rejected);

    let text = wait_for("metrics showing the receiver's counters", || {
        let text = api.metrics();
        (metric(
            &text,
            "ipevent_receiver_events_accepted_total{writer_id=\"test\"}",
        ) == Some(accepted as f64))
        .then_some(text)
    });
    assert_eq!(
        metric(
            &text,
            "ipevent_receiver_kernel_drops_total{writer_id=\"test\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "ipevent_receiver_datagrams_received_total{writer_id=\"test\"}"
        ),
        Some((accepted + rejected) as f64)
    );
    assert_eq!(
        metric(
            &text,
            "ipevent_receiver_rejected_all_total{writer_id=\"test\"}"
        ),
        Some(rejected as f64)
    );
    assert!(metric(&text, "ipevent_api_sync_rounds_total{result=\"ok\"}").unwrap() >= 1.0);
    assert_eq!(metric(&text, "ipevent_api_sync_failures_total"), Some(0.0));
    receiver.stop();
}

#[test]
fn post_is_counted_together_with_udp() {
    let (receiver, api) = start();
    api.reset();
    let socket = sender();
    let x = app(0x5c);
    send_events(
        &socket,
        receiver.addr,
        &[(x, "172.16.0.1"), (x, "172.16.0.2")],
    );
    for ip in ["172.16.0.2", "172.16.0.3", "1.1.1.1"] {
        let reply = api.post(&datagram(&x, ip));
        assert_eq!(reply.status, 202, "{reply:?}");
    }
    assert_eq!(api.post(b"\x0a\x40short").error(), "truncated");
    assert_eq!(
        api.report(&x),
        report_json(5, &["172.16.0.1", "172.16.0.2", "172.16.0.3"], &["1.1.1.1"])
    );
    let metrics = api.metrics();
    assert_eq!(
        metric(&metrics, "ipevent_api_post_events_accepted_total"),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "ipevent_api_post_events_rejected_total{reason=\"truncated\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn reset_between_batches_reports_exactly_the_second_batch() {
    let (mut receiver, api) = start();
    let socket = sender();
    let shared = app(0x33);
    let (only_a_flushed, only_a_pending, only_b) = (app(0x0a), app(0x0b), app(0xbb));

    // Batch A: part of it flushed (a read synced it), part still pending in the receiver.
    send_events(
        &socket,
        receiver.addr,
        &[
            (shared, "10.9.9.1"),
            (shared, "10.9.9.2"),
            (only_a_flushed, "10.0.0.1"),
        ],
    );
    assert_eq!(
        api.report(&shared),
        report_json(2, &["10.9.9.1", "10.9.9.2"], &[])
    );
    send_events(
        &socket,
        receiver.addr,
        &[
            (shared, "10.9.9.3"),
            (shared, "6.6.6.6"),
            (only_a_pending, "10.0.0.2"),
        ],
    );
    assert_eq!(api.post(&datagram(&shared, "10.9.9.4")).status, 202);
    receiver.wait_stats("batch A received", |s| s.events_accepted == 6);

    let done = api.reset();
    assert_eq!(done["receivers"], serde_json::json!(["test"]));

    // Batch B, to other addresses.
    let batch_b = [
        (shared, "10.9.9.6"),
        (shared, "10.9.9.9"),
        (shared, "10.9.9.9"),
        (shared, "7.7.7.7"),
        (only_b, "10.5.5.5"),
    ];
    send_events(&socket, receiver.addr, &batch_b);
    assert_eq!(
        api.report(&shared),
        report_json(4, &["10.9.9.6", "10.9.9.9"], &["7.7.7.7"])
    );
    assert_eq!(api.report(&only_b), report_json(1, &["10.5.5.5"], &[]));
    for gone in [only_a_flushed, only_a_pending] {
        assert_eq!(
            api.get(&format!("/events/{gone}")).status,
            404,
            "{gone} was before the reset"
        );
    }
    // The counters restarted too: the receiver's and the API's.
    let stats = receiver.wait_stats("counters of batch B only", |s| s.events_accepted == 5);
    assert_eq!(
        (stats.datagrams_received, stats.kernel_drops, stats.resets),
        (5, 0, 1)
    );
    assert_eq!(
        metric(&api.metrics(), "ipevent_api_post_events_accepted_total"),
        Some(0.0)
    );

    // A clean stop of the receiver keeps everything after the reset and nothing before.
    receiver.stop();
    assert_eq!(
        api.report(&shared),
        report_json(4, &["10.9.9.6", "10.9.9.9"], &["7.7.7.7"])
    );
    assert_eq!(
        api.get(&format!("/events/{shared}"))
            .header("x-ipevent-sync"),
        Some("none")
    );
}

#[test]
fn reset_in_the_middle_of_traffic_is_a_clean_cut() {
    let (mut receiver, api) = start();
    let to = receiver.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flow = app(0x01);
    // Event number n goes to address n, so the report says exactly which events it holds.
    let sender_thread = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let socket = sender();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < MAX_FLOW_EVENTS {
                socket.send_to(&datagram(&flow, &seq_ip(n)), to).unwrap();
                n += 1;
                sent.store(n, Ordering::Release);
                if n.is_multiple_of(FLOW_BURST) {
                    // Paced, so that the receiver keeps up and no datagram is lost.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    wait_for("the traffic to reach the store", || {
        (api.get(&format!("/events/{flow}")).status == 200).then_some(())
    });
    let sent_before = sent.load(Ordering::Acquire);
    api.reset();
    let answered_at = sent.load(Ordering::Acquire);
    wait_for("traffic after the reset", || {
        (sent.load(Ordering::Acquire) >= answered_at + 2 * FLOW_BURST).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    sender_thread.join().unwrap();
    let total = sent.load(Ordering::Acquire);

    // This read drains the receiver's socket; then one more datagram, which an empty buffer
    // cannot drop, brings the kernel's final drop count.
    let report = api.get(&format!("/events/{flow}")).json();
    let marker = app(0x02);
    sender()
        .send_to(&datagram(&marker, "10.0.0.1"), to)
        .unwrap();
    assert_eq!(api.get(&format!("/events/{marker}")).status, 200);
    let mut kept: Vec<u64> = ["good_ips", "bad_ips"]
        .iter()
        .flat_map(|k| {
            report[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| ip_seq(v.as_str().unwrap()))
        })
        .collect();
    kept.sort_unstable();
    let first = kept[0];
    // Nothing from before the reset, everything after: a contiguous tail of the flow.
    assert!(
        (sent_before..=answered_at).contains(&first),
        "first event kept is #{first}; the reset was sent after #{sent_before} and answered by #{answered_at}"
    );
    assert_eq!(report["count"], kept.len());
    // Counters restart at the reset too, but a batch already on its way to the store when
    // the reset began may be counted before it and stored after it: wait on what was stored.
    let stats = receiver.wait_stats("the flow stored", |s| s.events_flushed > kept.len() as u64);
    // Paced, the flow normally loses nothing; on a loaded machine the kernel may drop some,
    // and every one missing after the reset's answer is counted as a drop.
    let missing: Vec<u64> = (answered_at..total)
        .filter(|n| kept.binary_search(n).is_err())
        .collect();
    assert!(
        missing.len() as u64 <= stats.kernel_drops,
        "{} events after the reset are missing ({:?}...) and {} were dropped by the kernel",
        missing.len(),
        &missing[..missing.len().min(10)],
        stats.kernel_drops
    );
    if stats.kernel_drops == 0 {
        assert_eq!(
            kept,
            (first..total).collect::<Vec<_>>(),
            "events after the reset are missing"
        );
    }
    receiver.stop();
}

/// Upper bound on the events the paced flow sends, so a test always ends.
const MAX_FLOW_EVENTS: u64 = 1 << 22;
/// Datagrams the paced flow sends between pauses.
const FLOW_BURST: u64 = 64;

fn seq_ip(n: u64) -> String {
    std::net::Ipv4Addr::from(0x0a00_0000 | (n as u32 & 0x00ff_ffff)).to_string()
}

fn ip_seq(ip: &str) -> u64 {
    u64::from(u32::from(ip.parse::<std::net::Ipv4Addr>().unwrap()) & 0x00ff_ffff)
}

/// Upper bound on the datagrams a flooding thread sends, so a test always ends.
const MAX_FLOOD_DATAGRAMS: u64 = 5_000_000;

#[test]
fn fifty_concurrent_reads_while_the_receiver_ingests_at_full_speed() {
    const READERS: usize = 50;
    const ROUNDS_PER_READER: u64 = 4;
    let (mut receiver, api) = start();
    api.reset();
    let to = receiver.addr;
    let busy = app(0xee);
    let stop = Arc::new(AtomicBool::new(false));
    let flood_sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, flood_sent) = (stop.clone(), flood_sent.clone());
        std::thread::spawn(move || {
            let socket = sender();
            let payloads: Vec<Vec<u8>> = (0..256u32)
                .map(|i| datagram(&busy, &format!("10.20.{}.{}", i >> 4, i & 0xf)))
                .collect();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < MAX_FLOOD_DATAGRAMS {
                socket
                    .send_to(&payloads[(sent & 0xff) as usize], to)
                    .unwrap();
                sent += 1;
            }
            flood_sent.store(sent, Ordering::Relaxed);
        })
    };
    wait_for("the flood to reach the store", || {
        (api.get(&format!("/events/{busy}")).status == 200).then_some(())
    });

    let start_together = Arc::new(Barrier::new(READERS));
    let base = api.addr;
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let start_together = start_together.clone();
            std::thread::spawn(move || reader(i, base, busy, ROUNDS_PER_READER, &start_together))
        })
        .collect();
    let mut counts_seen = Vec::new();
    for reader in readers {
        counts_seen.extend(reader.join().expect("a reader failed"));
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    assert_eq!(counts_seen.len(), READERS * ROUNDS_PER_READER as usize);

    // Every datagram the flood sent is either in the report or counted as a kernel drop. The
    // kernel reports drops with the next datagram a socket takes in: a read drains the socket,
    // then one more datagram, which an empty buffer cannot drop, brings the final count.
    api.get(&format!("/events/{busy}"));
    socket_send_marker(to, &busy);
    let sent = flood_sent.load(Ordering::Relaxed) + 1;
    let final_count: u64 = api.get(&format!("/events/{busy}")).json()["count"]
        .as_u64()
        .unwrap();
    let stats = receiver.wait_stats("the flood fully counted", |s| {
        s.events_accepted >= final_count
    });
    assert_eq!(stats.events_accepted, final_count, "{stats:?}");
    assert_eq!(final_count + stats.kernel_drops, sent, "{stats:?}");
    assert!(counts_seen.iter().all(|c| *c <= final_count));
    let rounds = metric(
        &api.metrics(),
        "ipevent_api_sync_rounds_total{result=\"ok\"}",
    )
    .unwrap_or(0.0);
    eprintln!(
        "flood: {sent} datagrams, {} kernel drops; {} concurrent reads shared {rounds} syncs",
        stats.kernel_drops,
        2 * counts_seen.len()
    );
    receiver.stop();
}

fn socket_send_marker(to: SocketAddr, busy: &AppSha) {
    sender().send_to(&datagram(busy, "10.20.0.1"), to).unwrap();
}

/// One of the concurrent readers: reads the busy app, and checks read-after-write on an app
/// of its own (each round posts one more event and must see exactly that many). Its events
/// go through `POST /events`, which cannot drop them: over UDP, the flood may make the
/// kernel drop any datagram.
fn reader(i: usize, api: SocketAddr, busy: AppSha, rounds: u64, start: &Barrier) -> Vec<u64> {
    let mine = app(0);
    let mine = AppSha({
        let mut bytes = mine.0;
        bytes[0] = 0x77;
        bytes[1] = i as u8;
        bytes
    });
    start.wait();
    let mut counts = Vec::new();
    for round in 1..=rounds {
        let reply = http(
            "GET",
            &format!("http://{api}/events/{busy}"),
            &[("Accept", "application/json")],
            None,
        );
        assert_eq!(reply.status, 200, "reader {i}: {reply:?}");
        assert_eq!(reply.header("x-ipevent-sync"), Some("ok"), "reader {i}");
        let json = reply.json();
        assert!(
            json["good_ips"].is_array() && json["bad_ips"].is_array(),
            "{json}"
        );
        counts.push(json["count"].as_u64().expect("a count"));

        let ip = format!("10.30.{i}.{round}");
        let posted = http(
            "POST",
            &format!("http://{api}/events"),
            &[("Content-Type", "application/octet-stream")],
            Some(&datagram(&mine, &ip)),
        );
        assert_eq!(posted.status, 202, "reader {i}: {posted:?}");
        let reply = http("GET", &format!("http://{api}/events/{mine}"), &[], None);
        assert_eq!(reply.status, 200, "reader {i}: {reply:?}");
        let json = reply.json();
        assert_eq!(
            json["count"], round,
            "reader {i} round {round}: read-after-write broken: {json}"
        );
    }
    counts
}

#[test]
fn a_receiver_that_does_not_answer_is_reported_in_the_sync_header() {
    let (mut receiver, api) = start();
    let x = app(0x44);
    assert_eq!(api.post(&datagram(&x, "10.0.0.1")).status, 202);
    // SIGSTOP: the control socket accepts but nobody answers.
    let pid = receiver.pid().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let api_short = Api::start(
        receiver.data.root(),
        &["--sync-timeout-ms", "200", "--writer-id", "api-short"],
    );
    let reply = api_short.get(&format!("/events/{x}"));
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-ipevent-sync"), Some("failed"));
    assert_eq!(reply.body, report_json(1, &["10.0.0.1"], &[]));
    assert_eq!(
        metric(&api_short.metrics(), "ipevent_api_sync_failures_total"),
        Some(1.0)
    );
    // A reset that cannot hold every receiver does not happen.
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let reply = http("DELETE", &api_short.url("/events"), &[], None);
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.error().contains("not reset"), "{reply:?}");
    assert_eq!(api.report(&x), report_json(1, &["10.0.0.1"], &[]));
    drop(api);
    receiver.stop();
}

#[test]
fn the_api_refuses_a_writer_id_a_receiver_holds() {
    let (receiver, _api) = start();
    let mut command = Command::new(ipevent_testkit::bin("ipevent-api"));
    common::clear_ipevent_env(&mut command);
    let output = command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--writer-id",
            &receiver.writer_id,
        ])
        .arg("--data-dir")
        .arg(receiver.data.root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("writer id test is in use by another process"),
        "{stderr}"
    );
}

#[test]
fn the_test_client_verifies_through_the_api_across_resets() {
    let (mut receiver, api) = start();
    let mut received = 0;
    for seed in ["7", "8"] {
        // After a reset only this run's traffic may be reported: the client's exact counts
        // would fail on anything left from the previous run.
        api.reset();
        let output = Command::new(ipevent_testkit::bin("ipevent-test-client"))
            .args([
                "run",
                "--api",
                &api.url(""),
                "--to",
                &receiver.addr.to_string(),
            ])
            .args([
                "--seed",
                seed,
                "--count",
                "20000",
                "--rate",
                "0",
                "--json",
                "--no-progress",
            ])
            .output()
            .unwrap();
        let summary = ipevent_testkit::stdout_json(&output);
        // The client's reads drained the receiver's socket; one more datagram, which an empty
        // buffer cannot drop, brings the kernel's final drop count.
        sender()
            .send_to(&datagram(&app(0x02), "10.0.0.1"), receiver.addr)
            .unwrap();
        let sent = summary["sent"].as_u64().unwrap() + 1;
        let stats = receiver.wait_stats("the run counted", |s| {
            s.datagrams_received + s.kernel_drops >= sent
        });
        assert_eq!(
            stats.datagrams_received + stats.kernel_drops,
            sent,
            "seed {seed}"
        );
        received += sent;
        let verification = &summary["verification"];
        if stats.kernel_drops > 0 {
            // A loaded machine: the client sends at full speed and the kernel dropped some.
            // Each event the reports lack was one of them; nothing else may be missing.
            let dropped = verification["dropped"].as_u64().unwrap();
            assert!(
                dropped <= stats.kernel_drops,
                "seed {seed}: {dropped} events missing, {} kernel drops: {summary}",
                stats.kernel_drops
            );
            eprintln!(
                "seed {seed}: the kernel dropped {} datagrams; exact comparisons skipped",
                stats.kernel_drops
            );
            continue;
        }
        assert!(output.status.success(), "seed {seed}: {summary}");
        assert_eq!(summary["ok"], true, "seed {seed}: {summary}");
        assert_eq!(verification["reported"], summary["valid"], "seed {seed}");
        assert_eq!(verification["dropped"], 0, "seed {seed}");

        // The same reports, read here independently of the client.
        for expected in summary["apps"].as_array().unwrap() {
            let sha = expected["sha"].as_str().unwrap();
            let report = api.get(&format!("/events/{sha}")).json();
            assert_eq!(report["count"], expected["count"], "{sha}");
            assert_eq!(report["good_ips"], expected["good"], "{sha}");
            assert_eq!(report["bad_ips"], expected["bad"], "{sha}");
        }
        // The receiver refused exactly what the client corrupted, reason by reason.
        assert_eq!(
            serde_json::json!(stats.rejected),
            summary["rejected_by_reason"],
            "seed {seed}"
        );
    }
    assert_eq!(received, 40_002);
    receiver.stop();
}
