//! `ipevent-query --apk PATH`: the report of the app whose package file is given, the same
//! bytes as for its SHA.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use ipevent_testkit::{query, sender, Receiver};

/// The SHA-256 of `path` as `sha256sum` computes it: a second implementation to agree with.
fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("running sha256sum");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[test]
fn apk_answers_the_same_bytes_as_its_sha_and_prints_the_hash() {
    let rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    let apk = rx.data.root().join("app.apk");
    // Several chunks and a partial one, so the streaming is exercised.
    let bytes: Vec<u8> = (0..700_001u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&apk, &bytes).unwrap();
    let sha = sha256sum(&apk);
    let app: AppSha = sha.parse().unwrap();
    let tx = sender();
    for ip in ["52.84.10.33", "52.84.10.34", "52.84.10.34", "185.220.101.7"] {
        let ip = u32::from(ip.parse::<Ipv4Addr>().unwrap());
        tx.send_to(&wire::encode_to_vec(&IpEvent { app, ip }), rx.addr)
            .unwrap();
    }
    let by_sha = rx.query(&["--sync", &sha]);
    assert!(by_sha.status.success(), "{by_sha:?}");
    assert_eq!(
        String::from_utf8_lossy(&by_sha.stdout),
        "{\"count\":4,\"good_ips\":[\"52.84.10.33\",\"52.84.10.34\"],\"bad_ips\":[\"185.220.101.7\"]}\n"
    );
    let by_apk = rx.query(&["--apk", apk.to_str().unwrap()]);
    assert!(by_apk.status.success(), "{by_apk:?}");
    assert_eq!(by_apk.stdout, by_sha.stdout);
    let stderr = String::from_utf8_lossy(&by_apk.stderr);
    assert!(stderr.contains(&sha), "{stderr}");
    // Options apply as for a SHA.
    let detail = rx.query(&["--detail", &sha]);
    assert_eq!(
        rx.query(&["--detail", "--apk", apk.to_str().unwrap()])
            .stdout,
        detail.stdout
    );
}

#[test]
fn a_missing_or_unreadable_apk_is_a_one_line_error_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.apk");
    for path in [missing.as_path(), dir.path()] {
        let out = query(dir.path(), &["--apk", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    // A SHA and --apk together are a usage error.
    let out = query(
        dir.path(),
        &["--apk", missing.to_str().unwrap(), &"a".repeat(64)],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
