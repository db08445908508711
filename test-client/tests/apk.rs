//! `send --apk PATH`: the event goes out for the SHA-256 of the file, and `ipevent-query
//! --apk` answers for it the same bytes as for the SHA.

mod common;

use std::process::Command;

use common::{client, describe};
use ipevent_testkit::{bin, Receiver};

#[test]
fn send_apk_sends_for_the_files_sha() {
    let rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    let apk = rx.data.root().join("app.apk");
    std::fs::write(&apk, b"an app package").unwrap();
    let out = Command::new("sha256sum").arg(&apk).output().unwrap();
    let sha = String::from_utf8(out.stdout).unwrap()[..64].to_string();
    let to = rx.addr.to_string();
    for ip in ["10.9.8.1", "10.9.8.2"] {
        let out = client(&["send", "--to", &to, "--apk", apk.to_str().unwrap(), ip]);
        assert!(out.status.success(), "{}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(&sha));
    }
    let by_sha = rx.query(&["--sync", &sha]);
    assert_eq!(
        String::from_utf8_lossy(&by_sha.stdout),
        "{\"count\":2,\"good_ips\":[\"10.9.8.1\",\"10.9.8.2\"],\"bad_ips\":[]}\n",
        "{}",
        describe(&by_sha)
    );
    let by_apk = Command::new(bin("ipevent-query"))
        .arg("--data-dir")
        .arg(rx.data.root())
        .args(["--apk", apk.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(by_apk.stdout, by_sha.stdout, "{}", describe(&by_apk));
}

#[test]
fn send_apk_with_a_missing_file_or_no_app_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.apk");
    let out = client(&["send", "--apk", missing.to_str().unwrap(), "10.0.0.1"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("missing.apk"), "{stderr}");
    let out = client(&["send", "10.0.0.1"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}
