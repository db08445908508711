//! `ipevent-query forget <sha>`: one app removed everywhere, with the clean-reset guarantee for
//! that app, on a running receiver (what it holds in memory and in its journal) and on a
//! stopped one (its journal and app index). Real binaries, real sockets, real signals.
//!
//! The receivers flush only every 60 s here: every event a query sees went through a sync, a
//! forget's flush or a journal replay.

use std::net::{SocketAddr, UdpSocket};
use std::process::Output;

use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use ipevent_testkit::{sender, stdout_json, Receiver};

const SLOW_FLUSH: [&str; 4] = ["--flush-interval-ms", "60000", "--stats-interval-ms", "20"];

fn app(byte: u8) -> AppSha {
    AppSha([byte; 32])
}

fn send(tx: &UdpSocket, to: SocketAddr, events: &[(AppSha, &str)]) {
    for (app, ip) in events {
        let ip: std::net::Ipv4Addr = ip.parse().unwrap();
        let datagram = wire::encode_to_vec(&IpEvent {
            app: *app,
            ip: u32::from(ip),
        });
        tx.send_to(&datagram, to).expect("sending");
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The report of `app` (after a sync when `sync`), or `None` when the app is unknown (exit 1).
fn report(rx: &Receiver, app: &AppSha, sync: bool) -> Option<serde_json::Value> {
    let sha = app.to_hex();
    let out = if sync {
        rx.query(&["--sync", &sha])
    } else {
        rx.query(&[&sha])
    };
    match out.status.code() {
        Some(0) => Some(stdout_json(&out)),
        Some(1) => None,
        _ => panic!("ipevent-query {sha}: {out:?}"),
    }
}

/// `list` as (app, count) pairs.
fn listed(rx: &Receiver) -> Vec<(String, u64)> {
    let out = rx.query(&["list", "--limit", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout_json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["app_sha256"].as_str().unwrap().to_string(),
                a["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn forget(rx: &Receiver, app: &AppSha) -> serde_json::Value {
    let out = rx.query(&["forget", &app.to_hex()]);
    assert!(out.status.success(), "forget: {}", stderr(&out));
    stdout_json(&out)
}

#[test]
fn forget_on_a_running_receiver_removes_the_app_and_keeps_what_follows() {
    let (gone, kept) = (app(0xa1), app(0xb2));
    let tx = sender();
    let mut rx = Receiver::start(&SLOW_FLUSH);
    let dir = rx.take_tmp().unwrap();
    // Some of the app is in the store, some only in the receiver's memory and journal.
    send(&tx, rx.addr, &[(gone, "10.0.0.1"), (kept, "10.9.0.1")]);
    rx.wait_stats("the first events", |s| s.events_accepted == 2);
    assert_eq!(report(&rx, &gone, true).unwrap()["count"], 1);
    send(&tx, rx.addr, &[(gone, "10.0.0.2"), (gone, "8.8.8.8")]);
    rx.wait_stats("the pending events", |s| s.events_accepted == 4);

    let done = forget(&rx, &gone);
    assert_eq!(
        done,
        serde_json::json!({"forgotten": gone.to_hex(), "found": true, "receivers": ["test"]})
    );
    assert_eq!(report(&rx, &gone, false), None);
    assert_eq!(
        report(&rx, &gone, true),
        None,
        "nothing comes back at a flush"
    );
    assert_eq!(listed(&rx), [(kept.to_hex(), 1)]);

    // After the answer: counted, and it survives a kill (the journal replay brings back the
    // event that followed the forget, never those before it).
    send(&tx, rx.addr, &[(gone, "10.0.0.9")]);
    rx.wait_stats("the event after the forget", |s| s.events_accepted == 5);
    assert!(!rx.stop_with(libc::SIGKILL).success());
    let mut rx = Receiver::start_in(dir.path(), &SLOW_FLUSH);
    assert_eq!(rx.stats().unwrap().events_replayed, 1);
    assert_eq!(
        report(&rx, &gone, true).unwrap(),
        serde_json::json!({"count": 1, "good_ips": ["10.0.0.9"], "bad_ips": []})
    );
    assert_eq!(report(&rx, &kept, false).unwrap()["count"], 1);
    let mut apps = listed(&rx);
    apps.sort();
    assert_eq!(apps, [(gone.to_hex(), 1), (kept.to_hex(), 1)]);
    rx.stop();
}

#[test]
fn forget_with_no_receiver_running_empties_the_stopped_journal() {
    let (gone, kept) = (app(0xc3), app(0xd4));
    let tx = sender();
    let mut rx = Receiver::start(&SLOW_FLUSH);
    let dir = rx.take_tmp().unwrap();
    send(&tx, rx.addr, &[(gone, "10.0.0.1"), (gone, "10.0.0.2")]);
    send(&tx, rx.addr, &[(kept, "10.9.0.1")]);
    rx.wait_stats("every event", |s| s.events_accepted == 3);
    assert!(!rx.stop_with(libc::SIGKILL).success());
    // Queries count the stopped receiver's journal.
    assert_eq!(report(&rx, &gone, false).unwrap()["count"], 2);

    let done = forget(&rx, &gone);
    assert_eq!(
        done,
        serde_json::json!({"forgotten": gone.to_hex(), "found": true, "receivers": []})
    );
    assert_eq!(report(&rx, &gone, false), None);
    assert_eq!(listed(&rx), [(kept.to_hex(), 1)]);

    let mut rx = Receiver::start_in(dir.path(), &SLOW_FLUSH);
    assert_eq!(rx.stats().unwrap().events_replayed, 1, "only the kept app");
    assert_eq!(report(&rx, &gone, true), None);
    assert_eq!(report(&rx, &kept, false).unwrap()["count"], 1);
    rx.stop();
}

#[test]
fn forget_refuses_a_malformed_sha_or_store_and_accepts_an_unknown_app() {
    let rx = Receiver::start(&SLOW_FLUSH);
    for bad in ["not-a-sha", "abc", &"g".repeat(64)] {
        let out = rx.query(&["forget", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("not an app SHA-256"),
            "{}",
            stderr(&out)
        );
    }
    let out = rx.query(&["--store", "s3:/bucket", "forget", &app(1).to_hex()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("expected s3://BUCKET/PREFIX"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        forget(&rx, &app(7)),
        serde_json::json!({"forgotten": app(7).to_hex(), "found": false, "receivers": ["test"]})
    );
}
