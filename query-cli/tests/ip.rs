//! `ipevent-query ip ADDR[/PREFIX]`: the apps that talked to an address, through the real
//! binaries.

use std::net::Ipv4Addr;

use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use ipevent_testkit::{query, sender, stdout_json, Receiver};
use serde_json::json;

fn send(rx: &Receiver, app: AppSha, ip: &str, times: usize) {
    let tx = sender();
    let ip = u32::from(ip.parse::<Ipv4Addr>().unwrap());
    for _ in 0..times {
        tx.send_to(&wire::encode_to_vec(&IpEvent { app, ip }), rx.addr)
            .unwrap();
    }
}

#[test]
fn ip_lists_the_apps_of_an_address_by_count_with_good_from_each_report() {
    let rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    let (a, b, c) = (AppSha([0xaa; 32]), AppSha([0xbb; 32]), AppSha([0xcc; 32]));
    // For a, 185.220.101.7 is an outsider: bad. For b, it is in its /28: good.
    for host in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        send(&rx, a, host, 1);
    }
    send(&rx, a, "185.220.101.7", 2);
    send(&rx, b, "185.220.101.7", 5);
    send(&rx, b, "185.220.101.8", 1);
    send(&rx, c, "8.8.8.8", 1);

    let out = rx.query(&["--sync", "ip", "185.220.101.7"]);
    assert!(out.status.success(), "{out:?}");
    let value = stdout_json(&out);
    assert_eq!(value["ip"], "185.220.101.7");
    let apps = value["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 2, "{value}");
    assert_eq!(apps[0]["app_sha256"], b.to_hex());
    assert_eq!(apps[0]["count"], 5);
    assert_eq!(apps[0]["good"], true);
    assert_eq!(apps[1]["app_sha256"], a.to_hex());
    assert_eq!(apps[1]["count"], 2);
    assert_eq!(apps[1]["good"], false);
    assert!(apps[1]["first_seen"].as_str().unwrap().ends_with('Z'));
    assert!(apps[1]["last_seen"].as_str().unwrap().ends_with('Z'));

    // A block: b's two addresses together; host bits past the prefix are ignored.
    let value = stdout_json(&rx.query(&["ip", "185.220.101.77/24"]));
    assert_eq!(value["ip"], "185.220.101.0/24");
    assert_eq!(value["apps"][0]["count"], 6);
    assert_eq!(value["apps"][1]["count"], 2);

    // Nobody talked to it: an empty list, exit 0.
    let out = rx.query(&["ip", "192.0.2.1"]);
    assert!(out.status.success());
    assert_eq!(stdout_json(&out), json!({"ip": "192.0.2.1", "apps": []}));
}

#[test]
fn a_malformed_address_or_block_is_a_one_line_error_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "185.220.101",
        "185.220.101.7/33",
        "185.220.101.7/",
        "::1",
        "x",
    ] {
        let out = query(dir.path(), &["ip", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(out.stdout.is_empty());
    }
}
