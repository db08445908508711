//! Kernel drops are counted exactly: the real receiver with the smallest receive buffer is
//! stopped (SIGSTOP) while datagrams arrive, so the kernel drops most of them, and every
//! datagram sent is then either received or counted as dropped.

use std::process::Command;

use ipevent_core::wire::{self, IpEvent};
use ipevent_testkit::{sender, wait_for, Receiver, Rng};

/// Datagrams sent while the receiver is stopped: many times what the smallest buffer holds.
const SENT: u64 = 3000;

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// True when every thread of `pid` is stopped by a signal (state `T` in /proc).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            return false;
        };
        // The state follows the command name, which ends with the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim().chars().next());
        if state != Some('T') {
            return false;
        }
        any = true;
    }
    any
}

#[test]
fn every_datagram_is_received_or_counted_as_a_kernel_drop() {
    // The kernel raises a buffer this small to its minimum, which holds a few datagrams.
    let mut rx = Receiver::start(&["--rcvbuf-bytes", "1", "--stats-interval-ms", "10"]);
    let pid = rx.pid();
    let tx = sender();
    let app = Rng::new(11).app();
    let datagram = wire::encode_to_vec(&IpEvent {
        app,
        ip: 0x0a00_0001,
    });

    signal(pid, "STOP");
    wait_for("every thread of the receiver to stop", || {
        all_threads_stopped(pid).then_some(())
    });
    for _ in 0..SENT {
        tx.send_to(&datagram, rx.addr).expect("sending a datagram");
    }
    signal(pid, "CONT");

    // A sync drains the socket and reads its drop count before it answers.
    let out = rx.query(&["--sync", &app.to_hex()]);
    assert!(
        out.status.success(),
        "ipevent-query --sync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report JSON");
    let stats = rx.wait_stats("every datagram received or counted as dropped", |s| {
        s.datagrams_received + s.kernel_drops >= SENT
    });
    assert_eq!(stats.datagrams_received + stats.kernel_drops, SENT);
    assert!(
        stats.kernel_drops > 0,
        "a stopped receiver with the smallest buffer dropped nothing"
    );
    assert_eq!(report["count"].as_u64(), Some(stats.datagrams_received));

    rx.stop();
    let last = rx.stats().expect("stats after exit");
    assert_eq!(last.datagrams_received, stats.datagrams_received);
    assert_eq!(last.kernel_drops, stats.kernel_drops);
    assert_eq!(last.events_accepted, stats.datagrams_received);
}
