//! Shared helpers of the test client's end-to-end tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use ipevent_core::control::{self, Command as Control};
use ipevent_core::stats::ReceiverStats;
use ipevent_testkit::Receiver;
use serde_json::Value;

/// The test client built for these tests.
pub const CLIENT: &str = env!("CARGO_BIN_EXE_ipevent-test-client");

/// How long a control request may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the test client with `args` and returns its output.
pub fn client(args: &[&str]) -> Output {
    Command::new(CLIENT)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running ipevent-test-client")
}

/// Stdout and stderr of `output`, for failure messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The non-zero entries of a JSON object of counters.
pub fn nonzero(map: &Value) -> BTreeMap<String, u64> {
    map.as_object()
        .expect("a JSON object of counters")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a counter")))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Asks the receiver to drain and flush, then waits for a stats snapshot that has seen at
/// least `sent` datagrams (received or dropped by the kernel).
pub fn sync_and_stats(receiver: &mut Receiver, sent: u64) -> ReceiverStats {
    let socket = receiver.data.control_socket(&receiver.writer_id);
    control::request(&socket, Control::Sync, CONTROL_TIMEOUT).expect("sync with the receiver");
    receiver.wait_stats("stats covering every datagram sent", |s| {
        s.datagrams_received + s.kernel_drops >= sent && s.events_pending == 0
    })
}
