//! The test client against a real receiver: the lookout and random scenarios pass with
//! corruption on, every corrupted datagram is rejected under the reason the client expected,
//! and the verifier notices when the service reports something else than was sent.

mod common;

use common::{client, describe, nonzero, sync_and_stats};
use ipevent_test_client::corrupt::DATAGRAM_MAX_BYTES;
use ipevent_testkit::{stdout_json, window_datagrams, Receiver};
use serde_json::Value;

/// `--window` for the test client against `receiver`: as many datagrams as its socket buffer
/// holds, so the kernel has no reason to drop any however busy the machine is, and the
/// counts below are exact.
fn window(receiver: &Receiver) -> String {
    let stats = receiver.stats().expect("the receiver's stats");
    let rcvbuf_bytes = stats.rcvbuf_bytes.iter().copied().min().unwrap_or(0);
    window_datagrams(rcvbuf_bytes, DATAGRAM_MAX_BYTES).to_string()
}

fn assert_no_kernel_drops(stats: &ipevent_core::stats::ReceiverStats) {
    assert_eq!(
        stats.kernel_drops, 0,
        "the receiver's kernel dropped {} datagrams although the client kept within a window \
         its socket buffer holds",
        stats.kernel_drops
    );
}

fn run_against(receiver: &Receiver, extra: &[&str]) -> (std::process::Output, Value) {
    let window = window(receiver);
    let addr = receiver.addr.to_string();
    let data_dir = receiver
        .data
        .root()
        .to_str()
        .expect("utf-8 temp dir")
        .to_string();
    let mut args = vec![
        "--to",
        &addr,
        "--data-dir",
        &data_dir,
        "--json",
        "--no-progress",
        "--window",
        &window,
    ];
    args.extend_from_slice(extra);
    let output = client(&args);
    let summary = stdout_json(&output);
    (output, summary)
}

#[test]
fn lookout_with_corruption_is_verified_and_every_reject_reason_matches() {
    let mut receiver = Receiver::start(&["--stats-interval-ms", "50"]);
    let (output, summary) = run_against(
        &receiver,
        &[
            "--count",
            "20000",
            "--seed",
            "20240601",
            "--corrupt-pct",
            "30",
        ],
    );
    let sent = summary["sent"].as_u64().unwrap();
    let stats = sync_and_stats(&mut receiver, sent);
    assert_no_kernel_drops(&stats);
    assert!(output.status.success(), "{}", describe(&output));

    assert_eq!(sent, 20_000);
    assert_eq!(summary["scenario"], "lookout");
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["send_errors"], 0);
    let valid = summary["valid"].as_u64().unwrap();
    let corrupted = summary["corrupted"].as_u64().unwrap();
    assert_eq!(valid + corrupted, sent);

    // All three apps are checked, each exactly.
    let verification = &summary["verification"];
    assert_eq!(verification["ok"], true);
    assert_eq!(verification["dropped"], 0);
    assert_eq!(verification["handled_pct"], 100.0);
    let checks = verification["apps"].as_array().unwrap();
    let apps = summary["apps"].as_array().unwrap();
    assert_eq!(checks.len(), 3);
    assert_eq!(apps.len(), 3);
    let mut per_app_total = 0;
    for (app, check) in apps.iter().zip(checks) {
        assert_eq!(app["sha"], check["sha"]);
        assert_eq!(check["ok"], true, "{check}");
        assert_eq!(check["reported_count"], app["count"]);
        assert_eq!(app["good"].as_array().unwrap().len(), 14, "{app}");
        let bad = app["bad"].as_array().unwrap().len();
        assert!((1..=10).contains(&bad), "{app}");
        // The three apps send to the same addresses.
        assert_eq!(app["good"], apps[0]["good"]);
        assert_eq!(app["bad"], apps[0]["bad"]);
        per_app_total += app["count"].as_u64().unwrap();
    }
    assert_eq!(per_app_total, valid);

    // The receiver agrees datagram by datagram: what it accepted and, per reason, what it
    // refused. Every kind of corruption was sent.
    assert_eq!(stats.datagrams_received, sent);
    assert_eq!(stats.events_accepted, valid);
    assert_eq!(stats.rejected_total, corrupted);
    let by_kind = nonzero(&summary["corrupted_by_kind"]);
    assert_eq!(by_kind.len(), 8, "every corruption kind sent: {by_kind:?}");
    let expected_rejects = nonzero(&summary["rejected_by_reason"]);
    let actual_rejects: std::collections::BTreeMap<String, u64> = stats
        .rejected
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(actual_rejects, expected_rejects);
    for reason in [
        "empty",
        "oversize",
        "truncated",
        "missing_field",
        "sha_format",
        "ip_range",
    ] {
        assert!(
            expected_rejects.contains_key(reason),
            "no {reason} datagram sent: {expected_rejects:?}"
        );
    }
    receiver.stop();
}

#[test]
fn the_verifier_fails_when_the_service_counts_more_than_was_sent() {
    // The same seed twice into one data dir: the second run's apps already hold the first
    // run's events, so the service reports twice what the second run sent.
    let mut receiver = Receiver::start(&["--stats-interval-ms", "50"]);
    let args = ["--count", "3000", "--seed", "77", "--corrupt-pct", "20"];
    let (first, summary) = run_against(&receiver, &args);
    assert!(first.status.success(), "{}", describe(&first));
    // The second run's window starts from counters that cover the first run.
    sync_and_stats(&mut receiver, 3000);
    let (second, again) = run_against(&receiver, &args);
    let stats = sync_and_stats(&mut receiver, 6000);
    assert_no_kernel_drops(&stats);
    assert_eq!(second.status.code(), Some(1), "{}", describe(&second));
    assert_eq!(again["ok"], false);
    assert_eq!(again["verification"]["ok"], false);
    for (check, app) in again["verification"]["apps"]
        .as_array()
        .unwrap()
        .iter()
        .zip(summary["apps"].as_array().unwrap())
    {
        assert_eq!(check["extra"], app["count"], "{check}");
        assert_eq!(check["ok"], false);
        // The lists are still right: only the count is off.
        assert_eq!(check["good_ok"], true);
        assert_eq!(check["bad_ok"], true);
    }
    receiver.stop();
}

#[test]
fn random_scenario_verifies_every_app_when_there_are_few() {
    let mut receiver = Receiver::start(&["--stats-interval-ms", "50"]);
    let (output, summary) = run_against(
        &receiver,
        &[
            "--scenario",
            "random",
            "--apps",
            "12",
            "--verify-apps",
            "20",
            "--count",
            "6000",
            "--seed",
            "9",
        ],
    );
    let stats = sync_and_stats(&mut receiver, 6000);
    assert_no_kernel_drops(&stats);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(summary["scenario"], "random");
    assert_eq!(summary["apps_total"], 12);
    let checks = summary["verification"]["apps"].as_array().unwrap();
    assert_eq!(checks.len(), 12);
    assert!(checks.iter().all(|c| c["ok"] == true), "{checks:?}");
    // Every app has its own /28.
    let blocks: std::collections::BTreeSet<&str> = summary["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["block"].as_str().unwrap())
        .collect();
    assert_eq!(blocks.len(), 12);
    assert_eq!(stats.events_accepted, summary["valid"].as_u64().unwrap());
    receiver.stop();
}

#[test]
fn a_large_random_scenario_verifies_a_sample() {
    let mut receiver = Receiver::start(&["--stats-interval-ms", "50"]);
    let (output, summary) = run_against(
        &receiver,
        &[
            "--scenario",
            "random",
            "--apps",
            "200",
            "--verify-apps",
            "4",
            "--count",
            "6000",
            "--seed",
            "5",
        ],
    );
    let stats = sync_and_stats(&mut receiver, 6000);
    assert_no_kernel_drops(&stats);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(summary["apps_total"], 200);
    let checks = summary["verification"]["apps"].as_array().unwrap();
    assert_eq!(checks.len(), 4);
    for check in checks {
        // About 21 valid events per app: enough that the check is not vacuous.
        assert!(check["expected_count"].as_u64().unwrap() > 0, "{check}");
        assert_eq!(check["ok"], true, "{check}");
    }
    assert_eq!(summary["verification"]["ok"], true);
    assert_eq!(stats.events_accepted, summary["valid"].as_u64().unwrap());
    receiver.stop();
}

/// A real `ipevent-api` on the receiver's data dir, at a kernel-chosen port.
struct Api {
    child: std::process::Child,
    url: String,
    _ready_dir: tempfile::TempDir,
}

impl Api {
    fn start(receiver: &Receiver) -> Api {
        let ready_dir = tempfile::tempdir().unwrap();
        let ready = ready_dir.path().join("ready");
        let child = std::process::Command::new(ipevent_testkit::bin("ipevent-api"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(receiver.data.root())
            .arg("--ready-file")
            .arg(&ready)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawning ipevent-api");
        // The API writes the file atomically once it listens, with the bound address.
        let addr = ipevent_testkit::wait_for("the API's ready file", || {
            std::fs::read_to_string(&ready).ok()
        });
        Api {
            child,
            url: format!("http://{}", addr.trim()),
            _ready_dir: ready_dir,
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lookout_verified_through_the_api() {
    let mut receiver = Receiver::start(&["--stats-interval-ms", "50"]);
    let api = Api::start(&receiver);
    let addr = receiver.addr.to_string();
    let window = window(&receiver);
    let output = client(&[
        "--to",
        &addr,
        "--api",
        &api.url,
        "--json",
        "--no-progress",
        "--window",
        &window,
        "--count",
        "5000",
        "--seed",
        "31",
    ]);
    let summary = stdout_json(&output);
    let stats = sync_and_stats(&mut receiver, 5000);
    assert_no_kernel_drops(&stats);
    assert!(output.status.success(), "{}", describe(&output));
    let verification = &summary["verification"];
    assert_eq!(verification["ok"], true, "{verification}");
    assert_eq!(verification["expected"], summary["valid"]);
    assert_eq!(verification["reported"], summary["valid"]);
    assert_eq!(verification["apps"].as_array().unwrap().len(), 3);
    assert!(verification["source"]
        .as_str()
        .unwrap()
        .starts_with(&api.url));

    // An API with nothing behind it (another, empty data dir) makes every app fail. What the
    // receiver takes of these does not matter: the empty store reports none of them.
    let empty = Receiver::start(&[]);
    let empty_api = Api::start(&empty);
    let output = client(&[
        "--to",
        &addr,
        "--api",
        &empty_api.url,
        "--json",
        "--no-progress",
        "--count",
        "100",
        "--seed",
        "32",
        "--corrupt-pct",
        "0",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let summary = stdout_json(&output);
    assert_eq!(summary["verification"]["handled_pct"], 0.0);
    assert_eq!(summary["verification"]["dropped"], 100);
    receiver.stop();
}
