//! `send`, `encode` and `decode`: real processes, real pipes, a real socket.

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{client, describe, CLIENT};
use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use serde_json::{json, Value};

const SHA_UPPER: &str = "ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789";

fn sha_lower() -> String {
    SHA_UPPER.to_ascii_lowercase()
}

/// `encode <args>` piped into `decode <decode_args>`; returns decode's exit code and JSON.
fn pipe(encode_args: &[&str], decode_args: &[&str]) -> (Option<i32>, Value) {
    let mut encode = Command::new(CLIENT)
        .arg("encode")
        .args(encode_args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning encode");
    let decode = Command::new(CLIENT)
        .arg("decode")
        .args(decode_args)
        .stdin(Stdio::from(encode.stdout.take().unwrap()))
        .output()
        .expect("running decode");
    assert!(encode.wait().unwrap().success());
    let value = serde_json::from_slice(&decode.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", describe(&decode)));
    (decode.status.code(), value)
}

/// `decode <args>` with `input` on stdin.
fn decode(args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = Command::new(CLIENT)
        .arg("decode")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning decode");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn encode_then_decode_round_trips_raw_and_hex() {
    let want = json!({"app_sha256": sha_lower(), "ip": "10.1.2.3"});
    assert_eq!(pipe(&[SHA_UPPER, "10.1.2.3"], &[]), (Some(0), want.clone()));
    assert_eq!(
        pipe(&["--hex", SHA_UPPER, "10.1.2.3"], &["--hex"]),
        (Some(0), want)
    );
    // An address may also be given as an integer.
    let edge = json!({"app_sha256": sha_lower(), "ip": "255.255.255.255"});
    assert_eq!(pipe(&[SHA_UPPER, "4294967295"], &[]), (Some(0), edge));
}

#[test]
fn encode_writes_the_canonical_datagram() {
    let output = client(&["encode", SHA_UPPER, "1.2.3.4"]);
    assert!(output.status.success(), "{}", describe(&output));
    let event = IpEvent {
        app: SHA_UPPER.parse().unwrap(),
        ip: 0x0102_0304,
    };
    assert_eq!(output.stdout, wire::encode_to_vec(&event));
    let hex = client(&["encode", "--hex", SHA_UPPER, "1.2.3.4"]);
    let text = String::from_utf8(hex.stdout).unwrap();
    assert!(text.starts_with("0a40") && text.ends_with('\n'), "{text}");
}

#[test]
fn decode_of_an_invalid_datagram_exits_1_with_the_reason() {
    let cases: [(&[u8], &str); 4] = [
        (b"", "empty"),
        (b"\x0a\x40abc", "truncated"),
        (&[0u8; 1500], "oversize"),
        (b"\x10\x01", "missing_field"),
    ];
    for (input, reason) in cases {
        let output = decode(&[], input);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{reason}: {}",
            describe(&output)
        );
        let value: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(value, json!({ "error": reason }));
    }
    let hex = decode(&["--hex"], b"0a 40 61\n");
    assert_eq!(hex.status.code(), Some(1));
    assert_eq!(
        serde_json::from_slice::<Value>(&hex.stdout).unwrap(),
        json!({"error": "truncated"})
    );
}

#[test]
fn bad_input_is_a_one_line_error_with_exit_2() {
    for args in [
        vec!["encode", "abc", "1.2.3.4"],
        vec!["encode", SHA_UPPER, "1.2.3.400"],
        vec!["send", "--to", "127.0.0.1:9", SHA_UPPER, "4294967296"],
        vec!["run", "--scenario", "lookout", "--apps", "5"],
        vec!["--corrupt-pct", "150"],
        vec!["--to", "127.0.0.1:9", "--count", "10", "--window", "5"],
    ] {
        let output = client(&args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            describe(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.stdout.is_empty(), "{args:?}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        if args[0] != "--corrupt-pct" {
            assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        }
    }
    let output = decode(&["--hex"], b"zz");
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not hex"));
}

#[test]
fn send_delivers_one_event() {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let to = socket.local_addr().unwrap().to_string();
    let output = client(&["send", "--to", &to, SHA_UPPER, "192.168.7.9"]);
    assert!(output.status.success(), "{}", describe(&output));
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).unwrap();
    let event = wire::decode(&buf[..n]).unwrap();
    assert_eq!(event.app, SHA_UPPER.parse::<AppSha>().unwrap());
    assert_eq!(
        std::net::Ipv4Addr::from(event.ip).to_string(),
        "192.168.7.9"
    );
    socket.set_nonblocking(true).unwrap();
    let extra = socket.recv(&mut buf).unwrap_err();
    assert_eq!(
        extra.kind(),
        std::io::ErrorKind::WouldBlock,
        "send sent more than one datagram"
    );
}
