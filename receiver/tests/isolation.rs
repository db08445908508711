//! One bad app never breaks the others: a directory or a symlink planted where an app's log
//! or directory belongs is counted, reported as unreadable, never followed, and never blocks a
//! sync or a list. Real binaries, real files.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;

use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use ipevent_testkit::{sender, stdout_json, Receiver};

fn send(tx: &UdpSocket, to: SocketAddr, app: &AppSha, n: u32) {
    for ip in 0..n {
        tx.send_to(&wire::encode_to_vec(&IpEvent { app: *app, ip }), to)
            .expect("sending");
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn copy_dir_with_log(log: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(log, dir.join("test.log")).unwrap();
}

#[test]
fn a_planted_directory_or_symlink_isolates_its_app_only() {
    let good = AppSha([0x11; 32]);
    let log_is_dir = AppSha([0x22; 32]);
    let log_is_link = AppSha([0x33; 32]);
    let dir_is_link = AppSha([0x44; 32]);
    let tx = sender();
    let mut rx = Receiver::start(&["--flush-interval-ms", "600000"]);
    send(&tx, rx.addr, &good, 5);
    let out = rx.query(&["--sync", &good.to_hex()]);
    assert_eq!(stdout_json(&out)["count"], 5);

    // A valid log outside the tree, which neither writers nor readers may reach.
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.log");
    std::fs::copy(rx.data.log_path(&good, "test"), &victim).unwrap();
    let victim_bytes = std::fs::read(&victim).unwrap();
    std::fs::create_dir_all(rx.data.log_path(&log_is_dir, "test")).unwrap();
    std::fs::create_dir_all(rx.data.app_dir(&log_is_link)).unwrap();
    std::os::unix::fs::symlink(&victim, rx.data.log_path(&log_is_link, "test")).unwrap();
    let elsewhere = outside.path().join("app");
    copy_dir_with_log(&victim, &elsewhere);
    std::fs::create_dir_all(rx.data.app_dir(&dir_is_link).parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, rx.data.app_dir(&dir_is_link)).unwrap();

    for bad in [&log_is_dir, &log_is_link, &dir_is_link] {
        send(&tx, rx.addr, bad, 3);
    }
    send(&tx, rx.addr, &good, 4);
    rx.wait_stats("every event to be accepted", |s| s.events_accepted == 18);
    for round in 0..2 {
        let out = rx.query(&["--sync", &good.to_hex()]);
        assert!(out.stderr.is_empty(), "round {round}: {}", stderr(&out));
        assert_eq!(stdout_json(&out)["count"], 9, "round {round}");
    }
    let stats = rx.stats().unwrap();
    assert_eq!(stats.events_refused, 9, "{stats:?}");
    assert_eq!(
        stats.events_pending, 0,
        "nothing parked for ever: {stats:?}"
    );
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        victim_bytes,
        "never written through"
    );

    // `list` shows every app, the bad ones as unreadable, and exits 0.
    let out = rx.query(&["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = stdout_json(&out);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0]["app_sha256"], good.to_hex());
    assert_eq!(rows[0]["count"], 9);
    assert!(rows[0].get("unreadable").is_none());
    for row in &rows[1..] {
        assert_eq!(
            row["count"], 0,
            "nothing outside the tree is counted: {row}"
        );
        assert!(row["unreadable"].is_string(), "{row}");
    }
    assert_eq!(stderr(&out).lines().count(), 3, "{}", stderr(&out));

    // A report never counts what a link points to, and says why.
    for bad in [&log_is_dir, &log_is_link, &dir_is_link] {
        let out = rx.query(&[&bad.to_hex()]);
        assert_eq!(out.status.code(), Some(3), "{bad}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
    rx.stop();
}
