//! The control socket against clients that misbehave or die: idle and trickling connections,
//! a reset whose client never ends it, queries during a restart. The real receiver binary, a
//! real Unix socket, the real `ipevent-query`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ipevent_core::control::{self, ControlError, Reply};
use ipevent_core::AppSha;
use ipevent_testkit::{receiver_command, sender, stdout_json, Receiver, WAIT_LIMIT};

fn send_events(rx: &Receiver, app: AppSha, n: u32) {
    let ips = (0..n).map(|i| 0x0a00_0001 + i % 14);
    ipevent_testkit::send_events(&sender(), rx.addr, &app, ips);
}

/// Asserts that `ipevent-query --sync` succeeded without a warning and counted `accepted`.
fn assert_counted(out: &Output, accepted: u64) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert_eq!(stdout_json(out)["count"], accepted);
}

/// Waits until the receiver has read or lost (counted as kernel drops) `n` datagrams since
/// its start or last reset, and has accepted every one it read; returns how many it accepted.
fn wait_accepted(rx: &mut Receiver, n: u64) -> u64 {
    rx.wait_stats("the datagrams to be read and accepted", |s| {
        s.datagrams_received + s.kernel_drops >= n && s.events_accepted == s.datagrams_received
    })
    .events_accepted
}

fn connect(rx: &Receiver) -> UnixStream {
    let stream = UnixStream::connect(rx.data.control_socket(&rx.writer_id)).expect("connecting");
    // Only so that a real hang fails the test instead of blocking it.
    stream.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    stream
}

fn read_reply(stream: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("reading a reply");
    line
}

#[test]
fn idle_control_connections_never_keep_a_sync_out() {
    let mut rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    // Far more idle connections than there are slots; none sends anything.
    let idle: Vec<UnixStream> = (0..64).map(|_| connect(&rx)).collect();
    let app = AppSha([0x31; 32]);
    send_events(&rx, app, 3);
    let accepted = wait_accepted(&mut rx, 3);

    let out = rx.query(&["--sync", &app.to_hex()]);
    assert_counted(&out, accepted);

    let stats = rx.wait_stats("the full slots to be counted", |s| s.control_conns_full > 0);
    assert!(
        stats.control_conns_full >= 48,
        "{}",
        stats.control_conns_full
    );
    drop(idle);
}

#[test]
fn a_connection_that_sends_nothing_is_closed() {
    let rx = Receiver::start(&[]);
    let stream = connect(&rx);
    // A partial line, never finished.
    (&stream).write_all(b"syn").unwrap();
    let line = read_reply(&stream);
    assert!(line.starts_with("err no request within"), "{line:?}");
}

#[test]
fn the_control_socket_is_private_to_its_user() {
    let rx = Receiver::start(&[]);
    let mode = std::fs::metadata(rx.data.control_socket(&rx.writer_id))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

#[test]
fn a_reset_whose_client_dies_ends_its_hold_and_no_sync_says_ok_meanwhile() {
    let mut rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    let socket = rx.data.control_socket(&rx.writer_id);
    let before = AppSha([0x41; 32]);
    send_events(&rx, before, 2);
    wait_accepted(&mut rx, 2);

    let holder = connect(&rx);
    (&holder).write_all(b"reset-begin\n").unwrap();
    let line = read_reply(&holder);
    assert!(line.starts_with("ok "), "{line:?}");
    let after = AppSha([0x42; 32]);
    send_events(&rx, after, 5);
    let accepted = wait_accepted(&mut rx, 5);

    // While the hold lasts, a sync cannot flush, so it must not answer.
    match control::request(&socket, control::Command::Sync, Duration::from_secs(1)) {
        Err(ControlError::Timeout(_)) => {}
        other => panic!("a sync answered while flushes were held: {other:?}"),
    }

    // The client dies without `reset-end`.
    drop(holder);
    let out = rx.query(&["--sync", &after.to_hex()]);
    assert_counted(&out, accepted);
    let out = rx.query(&[&before.to_hex()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "pending events before the reset are gone"
    );
}

#[test]
fn a_reset_ended_on_its_connection_resumes_flushes() {
    let mut rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    let socket = rx.data.control_socket(&rx.writer_id);
    let hold = control::hold(&socket, WAIT_LIMIT).expect("reset-begin");
    let app = AppSha([0x51; 32]);
    send_events(&rx, app, 4);
    let accepted = wait_accepted(&mut rx, 4);
    hold.end(WAIT_LIMIT).expect("reset-end");
    let out = rx.query(&["--sync", &app.to_hex()]);
    assert!(out.status.success());
    assert_eq!(stdout_json(&out)["count"], accepted);

    // reset-end anywhere else is refused.
    match control::request(&socket, control::Command::ResetEnd, WAIT_LIMIT) {
        Err(ControlError::Refused(message)) => {
            assert!(message.contains("reset-begin"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // Syncs answer again.
    assert!(matches!(
        control::request(&socket, control::Command::Sync, WAIT_LIMIT),
        Ok(Reply::Synced(_))
    ));
}

#[test]
fn a_sync_right_after_a_restart_reports_what_the_journal_holds() {
    let mut rx = Receiver::start(&["--flush-interval-ms", "600000"]);
    let app = AppSha([0x61; 32]);
    send_events(&rx, app, 50);
    let accepted = wait_accepted(&mut rx, 50);
    let status = rx.stop_with(libc::SIGKILL);
    assert!(!status.success());
    let tmp = rx.take_tmp().expect("the data dir");

    // Restart; as soon as it has bound its UDP socket (it logs the buffer it got), it is a
    // running receiver, and a query must see everything it had accepted before the kill.
    let mut child = receiver_command(tmp.path())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning ipevent-receiver");
    let stderr = child.stderr.take().unwrap();
    let (bound_tx, bound_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("receive buffer") {
                let _ = bound_tx.send(());
            }
        }
    });
    let bound = bound_rx.recv_timeout(WAIT_LIMIT);
    let out = ipevent_testkit::query(tmp.path(), &["--sync", &app.to_hex()]);
    let _ = child.kill();
    let _ = child.wait();
    bound.expect("the receiver to bind its UDP socket");
    assert_counted(&out, accepted);
}

#[test]
fn a_reset_begun_by_a_client_that_closes_at_once_holds_nothing() {
    let mut rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    // The line and the close may reach the receiver together.
    let stream = connect(&rx);
    (&stream).write_all(b"reset-begin\n").unwrap();
    drop(stream);
    rx.wait_stats("the reset to be served", |s| s.resets == 1);
    let app = AppSha([0x71; 32]);
    send_events(&rx, app, 3);
    let accepted = wait_accepted(&mut rx, 3);
    let out = rx.query(&["--sync", &app.to_hex()]);
    assert_counted(&out, accepted);
}

#[test]
fn reset_end_sent_right_behind_reset_begin_is_served_in_order() {
    let rx = Receiver::start(&[]);
    let stream = connect(&rx);
    (&stream).write_all(b"reset-begin\nreset-end\n").unwrap();
    let mut reader = BufReader::new(&stream);
    let mut begun = String::new();
    reader.read_line(&mut begun).unwrap();
    assert!(begun.starts_with("ok {\"dropped_pending\""), "{begun:?}");
    let mut ended = String::new();
    reader.read_line(&mut ended).unwrap();
    assert!(ended.starts_with("ok {\"epoch\""), "{ended:?}");
}
