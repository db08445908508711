//! `ipevent-query` as operators run it: the real binary over a store the real receiver wrote.

use std::net::Ipv4Addr;
use std::process::Command;

use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use ipevent_testkit::{bin, query, sender, stdout_json, Receiver};

fn ip(text: &str) -> u32 {
    u32::from(text.parse::<Ipv4Addr>().unwrap())
}

/// A receiver holding two apps: `a` with 3 hosts of 10.0.0.0/28 (2 events each) and one
/// outsider, `b` with one address.
fn two_apps() -> (Receiver, AppSha, AppSha) {
    let rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    let tx = sender();
    let (a, b) = (AppSha([0xaa; 32]), AppSha([0xbb; 32]));
    let mut events = vec![];
    for host in ["10.0.0.1", "10.0.0.2", "10.0.0.10"] {
        events.push((a, ip(host)));
        events.push((a, ip(host)));
    }
    events.push((a, ip("192.0.2.77")));
    events.push((b, ip("8.8.8.8")));
    for (app, ip) in events {
        tx.send_to(&wire::encode_to_vec(&IpEvent { app, ip }), rx.addr)
            .unwrap();
    }
    let out = rx.query(&["--sync", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (rx, a, b)
}

#[test]
fn report_detail_and_pretty_keep_the_contract_shape() {
    let (rx, a, _) = two_apps();
    let out = rx.query(&[&a.to_hex()]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"count\":7,\"good_ips\":[\"10.0.0.1\",\"10.0.0.2\",\"10.0.0.10\"],\"bad_ips\":[\"192.0.2.77\"]}\n"
    );
    // Upper case names the same app.
    let out = rx.query(&[&a.to_hex().to_uppercase()]);
    assert_eq!(stdout_json(&out)["count"], 7);

    let detail = stdout_json(&rx.query(&["--detail", &a.to_hex()]));
    assert_eq!(detail["netblock"], "10.0.0.0/28");
    let addresses = detail["addresses"].as_array().unwrap();
    assert_eq!(addresses.len(), 4);
    assert_eq!(addresses[0]["ip"], "10.0.0.1");
    assert_eq!(addresses[0]["count"], 2);
    assert_eq!(addresses[0]["good"], true);
    assert_eq!(addresses[3]["good"], false);
    assert!(addresses[0]["first_seen"].as_str().unwrap().ends_with('Z'));

    let pretty = rx.query(&["--pretty", &a.to_hex()]);
    let text = String::from_utf8(pretty.stdout).unwrap();
    assert!(text.contains("\n  \"count\": 7"), "{text}");
}

#[test]
fn exit_codes_say_what_went_wrong() {
    let (rx, _, _) = two_apps();
    let unknown = rx.query(&[&AppSha([0x01; 32]).to_hex()]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no events for app"));
    assert!(unknown.stdout.is_empty());

    for bad in ["xyz", "../../etc/passwd", &"g".repeat(64), &"a".repeat(65)] {
        let out = rx.query(&[bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().count(),
            1,
            "{bad}"
        );
    }
    let out = Command::new(bin("ipevent-query"))
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin("ipevent-query")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));

    // A layout this build does not know is refused, not misread.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("LAYOUT"), "ipevent-store 99\n").unwrap();
    let out = query(dir.path(), &[&AppSha([0xaa; 32]).to_hex()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported store layout"));
}

#[test]
fn list_orders_by_count_and_limits() {
    let (rx, a, b) = two_apps();
    let list = stdout_json(&rx.query(&["list"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["app_sha256"], a.to_hex());
    assert_eq!(list[0]["count"], 7);
    assert_eq!(list[1]["app_sha256"], b.to_hex());
    let limited = stdout_json(&rx.query(&["list", "--limit", "1"]));
    assert_eq!(limited.as_array().unwrap().len(), 1);
}

#[test]
fn sync_without_a_receiver_warns_and_reads_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let out = query(dir.path(), &["--sync", &AppSha([0xaa; 32]).to_hex()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no receiver is running"), "{stderr}");
}

#[test]
fn capacity_estimates_and_refuses_nonsense() {
    let out = Command::new(bin("ipevent-query"))
        .args([
            "capacity",
            "--apps",
            "1000",
            "--addresses-per-app",
            "14",
            "--events-per-sec",
            "20000",
            "--days",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let estimate = stdout_json(&out);
    assert!(estimate
        .as_object()
        .unwrap()
        .values()
        .any(|v| v.as_f64().unwrap_or(0.0) > 0.0));

    let out = Command::new(bin("ipevent-query"))
        .args([
            "capacity",
            "--apps",
            "0",
            "--addresses-per-app",
            "14",
            "--events-per-sec",
            "1",
            "--days",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("apps must be at least 1"));
}

#[test]
fn a_reader_that_went_away_ends_the_output_quietly() {
    // A pipe whose reading end is closed before the query writes: every write fails with EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin("ipevent-query"))
        .args([
            "capacity",
            "--apps",
            "1000",
            "--addresses-per-app",
            "14",
            "--events-per-sec",
            "100",
            "--days",
            "1",
        ])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
