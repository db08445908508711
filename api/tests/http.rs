//! The API on its own (no receiver running): every status code, the admin token, the flags
//! and a clean stop. Real `ipevent-api` processes, real HTTP over 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use common::{app, datagram, http, metric, raw_request, report_json, vectors, Api, ApiHttp};
use ipevent_core::wire::MAX_DATAGRAM_BYTES;
use ipevent_testkit::bin;

const UNKNOWN_SHA: &str = "00000000000000000000000000000000000000000000000000000000000000ff";

#[test]
fn root_healthz_and_unknown_routes() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);

    let root = api.get("/");
    assert_eq!(root.status, 200);
    assert_eq!(
        root.json(),
        serde_json::json!({ "name": "ipevent-api", "version": ipevent_core::VERSION })
    );

    let health = api.get("/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    let missing = api.get("/nope");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error(), "no such route");

    let wrong_method = http("PUT", &api.url("/events"), &[], Some(b"x"));
    assert_eq!(wrong_method.status, 405);
}

#[test]
fn the_default_listen_address_is_dual_stack() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start_on("[::]:0", data.path(), &[]);
    let port = api.addr.port();
    let known = app(0x11);
    assert_eq!(api.post(&datagram(&known, "10.0.0.1")).status, 202);
    let mut urls = vec![format!("http://127.0.0.1:{port}")];
    if api.addr.is_ipv6() {
        urls.push(format!("http://[::1]:{port}"));
    } else {
        // The host has no IPv6: the API said so and fell back to IPv4.
        assert_eq!(api.addr.ip(), std::net::Ipv4Addr::UNSPECIFIED);
    }
    for base in urls {
        let reply = http("GET", &format!("{base}/events/{known}"), &[], None);
        assert_eq!(reply.status, 200, "{base}: {reply:?}");
        assert_eq!(reply.body, report_json(1, &["10.0.0.1"], &[]));
    }
    // An IPv4 client reaches a dual-stack socket as ::ffff:127.0.0.1, still loopback.
    let reply = http(
        "DELETE",
        &format!("http://127.0.0.1:{port}/events"),
        &[],
        None,
    );
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[test]
fn healthz_reports_an_unreadable_data_dir() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);
    std::fs::remove_dir_all(data.path().join("events")).unwrap();
    let health = api.get("/healthz");
    assert_eq!(health.status, 503, "{health:?}");
    assert!(health.body.contains("data dir unreadable"), "{health:?}");
}

#[test]
fn get_statuses_400_404_406_and_200() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);

    for bad in [
        "xyz",
        &"g".repeat(64),
        &"a".repeat(63),
        &"a".repeat(65),
        "..%2F..%2Fetc",
    ] {
        let reply = api.get(&format!("/events/{bad}"));
        assert_eq!(reply.status, 400, "{bad}: {reply:?}");
        assert!(reply.error().contains("64 hex digits"), "{reply:?}");
    }

    let unknown = api.get(&format!("/events/{UNKNOWN_SHA}"));
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unknown.error(), format!("unknown app {UNKNOWN_SHA}"));
    assert_eq!(
        unknown.header("x-ipevent-sync"),
        Some("none"),
        "no receiver runs"
    );

    let known = app(0xab);
    assert_eq!(api.post(&datagram(&known, "10.0.0.1")).status, 202);
    for accept in [
        "application/json",
        "*/*",
        "application/*",
        "text/html, application/json;q=0.5",
    ] {
        let reply = http(
            "GET",
            &api.url(&format!("/events/{known}")),
            &[("Accept", accept)],
            None,
        );
        assert_eq!(reply.status, 200, "Accept: {accept}: {reply:?}");
        assert_eq!(reply.body, report_json(1, &["10.0.0.1"], &[]));
        assert_eq!(reply.header("content-type"), Some("application/json"));
    }
    // Upper case is the same app.
    let upper = api.get(&format!("/events/{}", known.to_string().to_uppercase()));
    assert_eq!(upper.body, report_json(1, &["10.0.0.1"], &[]));

    // Without any Accept header.
    let (status, answer) = raw_request(
        api.addr,
        &format!("GET /events/{known} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, "HTTP/1.1 200 OK", "{answer}");
    assert!(
        answer.ends_with(&report_json(1, &["10.0.0.1"], &[])),
        "{answer}"
    );

    for accept in [
        "text/html",
        "application/xml, text/plain",
        "application/json;q=0",
    ] {
        let reply = http(
            "GET",
            &api.url(&format!("/events/{known}")),
            &[("Accept", accept)],
            None,
        );
        assert_eq!(reply.status, 406, "Accept: {accept}: {reply:?}");
    }
    // 406 also for an unknown app: the representation is refused before anything is read.
    let reply = http(
        "GET",
        &api.url(&format!("/events/{UNKNOWN_SHA}")),
        &[("Accept", "text/html")],
        None,
    );
    assert_eq!(reply.status, 406);

    let detail = api.get(&format!("/events/{known}?detail=1")).json();
    assert_eq!(detail["count"], 1);
    assert_eq!(detail["netblock"], "10.0.0.0/28");
    assert_eq!(detail["addresses"][0]["ip"], "10.0.0.1");
    assert_eq!(detail["addresses"][0]["count"], 1);
    assert_eq!(
        api.get(&format!("/events/{known}?detail=0")).body,
        report_json(1, &["10.0.0.1"], &[])
    );
    assert_eq!(api.get(&format!("/events/{known}?detail=yes")).status, 400);
}

#[test]
fn post_validates_like_the_receiver() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);
    let mut stored: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    for common::Vector {
        name,
        bytes,
        verdict,
        ..
    } in vectors()
    {
        let reply = api.post(&bytes);
        match verdict {
            Ok((sha, ip)) => {
                assert_eq!(reply.status, 202, "{name}: {reply:?}");
                stored.entry(sha.to_lowercase()).or_default().push(ip);
            }
            Err(reason) if bytes.len() > MAX_DATAGRAM_BYTES => {
                assert_eq!(reply.status, 413, "{name}: {reply:?}");
                assert_eq!(reply.error(), reason, "{name}");
                *rejected.entry(reason).or_default() += 1;
            }
            Err(reason) => {
                assert_eq!(reply.status, 400, "{name}: {reply:?}");
                assert_eq!(reply.error(), reason, "{name}");
                *rejected.entry(reason).or_default() += 1;
            }
        }
    }
    // What was stored is exactly the valid vectors, keyed by the lower-case SHA.
    for (sha, ips) in &stored {
        let report = api.get(&format!("/events/{sha}")).json();
        assert_eq!(report["count"], ips.len() as u64, "{sha}");
        let mut seen: Vec<String> = ["good_ips", "bad_ips"]
            .iter()
            .flat_map(|k| {
                report[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
            })
            .collect();
        seen.sort();
        let mut expected = ips.clone();
        expected.sort();
        expected.dedup();
        assert_eq!(seen, expected, "{sha}");
    }
    let metrics = api.metrics();
    let accepted: usize = stored.values().map(Vec::len).sum();
    assert_eq!(
        metric(&metrics, "ipevent_api_post_events_accepted_total"),
        Some(accepted as f64)
    );
    for (reason, n) in &rejected {
        let line = format!("ipevent_api_post_events_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&metrics, &line), Some(*n as f64), "{reason}");
    }
}

#[test]
fn post_statuses_413_and_415() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);
    let event = datagram(&app(1), "10.0.0.1");

    let too_big = vec![0x0a; MAX_DATAGRAM_BYTES + 1];
    let reply = api.post(&too_big);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.error(), "oversize");
    // At the limit it is parsed (and refused for what it is, not for its size).
    let reply = api.post(&vec![0x0a; MAX_DATAGRAM_BYTES]);
    assert_eq!((reply.status, reply.error().as_str()), (400, "truncated"));

    for content_type in ["text/plain", "application/json", "multipart/form-data"] {
        let reply = http(
            "POST",
            &api.url("/events"),
            &[("Content-Type", content_type)],
            Some(&event),
        );
        assert_eq!(reply.status, 415, "{content_type}: {reply:?}");
    }
    let reply = http("POST", &api.url("/events"), &[], Some(&event));
    assert_eq!(reply.status, 415, "no content type: {reply:?}");
    let reply = http(
        "POST",
        &api.url("/events"),
        &[("Content-Type", "application/x-protobuf")],
        Some(&event),
    );
    assert_eq!(reply.status, 202, "{reply:?}");

    // Only the one accepted body is counted.
    assert_eq!(
        api.get(&format!("/events/{}", app(1))).body,
        report_json(1, &["10.0.0.1"], &[])
    );
}

#[test]
fn delete_resets_what_post_stored() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);
    assert_eq!(api.post(&datagram(&app(2), "10.0.0.1")).status, 202);
    assert_eq!(api.post(&datagram(&app(2), "10.0.0.1")).status, 202);
    assert_eq!(
        api.get(&format!("/events/{}", app(2))).body,
        report_json(2, &["10.0.0.1"], &[])
    );
    assert_eq!(
        metric(&api.metrics(), "ipevent_api_post_events_accepted_total"),
        Some(2.0)
    );

    let done = api.reset();
    assert_eq!(done, serde_json::json!({ "reset": true, "receivers": [] }));
    assert_eq!(api.get(&format!("/events/{}", app(2))).status, 404);
    let metrics = api.metrics();
    assert_eq!(
        metric(&metrics, "ipevent_api_post_events_accepted_total"),
        Some(0.0)
    );
    assert_eq!(metric(&metrics, "ipevent_api_resets_total"), Some(1.0));

    // The API's writer starts a fresh log in the new tree.
    assert_eq!(api.post(&datagram(&app(2), "10.0.0.3")).status, 202);
    assert_eq!(
        api.get(&format!("/events/{}", app(2))).body,
        report_json(1, &["10.0.0.3"], &[])
    );
    // The old tree is gone from the trash once the background deletion ran.
    ipevent_testkit::wait_for("the trash to be emptied", || {
        let left = std::fs::read_dir(data.path().join("trash")).ok()?.count();
        (left == 0).then_some(())
    });
}

#[test]
fn reset_needs_the_token_when_loopback_is_not_trusted() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(
        data.path(),
        &[
            "--admin-token",
            "s3cret-s3cret-s3cret",
            "--allow-loopback-admin=false",
        ],
    );
    assert_eq!(api.post(&datagram(&app(3), "10.0.0.1")).status, 202);
    let delete = |headers: &[(&str, &str)]| http("DELETE", &api.url("/events"), headers, None);

    let reply = delete(&[]);
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    let reply = delete(&[("Authorization", "Bearer wrong")]);
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(reply.error(), "wrong admin token");
    let reply = delete(&[("Authorization", "Basic czNjcmV0")]);
    assert_eq!(reply.status, 401, "{reply:?}");
    // Nothing was reset by the refused attempts.
    assert_eq!(api.get(&format!("/events/{}", app(3))).status, 200);

    let reply = delete(&[("Authorization", "Bearer s3cret-s3cret-s3cret")]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(api.get(&format!("/events/{}", app(3))).status, 404);
    let metrics = api.metrics();
    assert_eq!(
        metric(
            &metrics,
            "ipevent_api_requests_total{route=\"/events\",method=\"DELETE\",status=\"401\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "ipevent_api_requests_total{route=\"/events\",method=\"DELETE\",status=\"403\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn wrong_tokens_are_limited_and_tokens_are_not_trimmed() {
    let data = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef0123";
    let api = Api::start(
        data.path(),
        &["--admin-token", token, "--allow-loopback-admin=false"],
    );
    let delete = |value: &str| {
        http(
            "DELETE",
            &api.url("/events"),
            &[("Authorization", value)],
            None,
        )
    };
    // The token with a space in front was accepted once, trimmed; now it is a wrong token.
    let reply = delete(&format!("Bearer  {token}"));
    assert_eq!(reply.status, 403, "{reply:?}");
    for guess in 0..4 {
        let reply = delete(&format!("Bearer guess-{guess}"));
        assert_eq!(reply.status, 403, "{reply:?}");
    }
    // Five wrong tokens: the peer waits, even with the right one.
    let reply = delete(&format!("Bearer {token}"));
    assert_eq!(reply.status, 429, "{reply:?}");
    assert!(
        reply.error().contains("too many wrong admin tokens"),
        "{reply:?}"
    );
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{reply:?}");
}

#[test]
fn a_short_admin_token_stops_the_api_with_one_line() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    for token in ["", "fifteen-bytes!!"] {
        let (code, stderr) = run_failing(&[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir,
            "--admin-token",
            token,
        ]);
        assert_eq!(code, 1, "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("ipevent-api: the admin token") && stderr.contains("16 bytes"),
            "{stderr}"
        );
        assert!(token.is_empty() || !stderr.contains(token), "{stderr}");
    }
    // From the environment too.
    let mut command = Command::new(bin("ipevent-api"));
    common::clear_ipevent_env(&mut command);
    let output = command
        .args(["--listen", "127.0.0.1:0", "--data-dir", dir])
        .env("IPEVENT_ADMIN_TOKEN", "short")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is 5 bytes"), "{stderr}");
}

#[test]
fn reset_is_refused_to_everyone_without_token_or_loopback_trust() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &["--allow-loopback-admin=false"]);
    let reply = http(
        "DELETE",
        &api.url("/events"),
        &[("Authorization", "Bearer anything")],
        None,
    );
    assert_eq!(reply.status, 403, "{reply:?}");
}

#[test]
fn the_token_can_come_from_the_environment() {
    let data = tempfile::tempdir().unwrap();
    let ready_dir = tempfile::tempdir().unwrap();
    let ready = ready_dir.path().join("ready");
    let mut command = Command::new(bin("ipevent-api"));
    common::clear_ipevent_env(&mut command);
    let mut child = command
        .args(["--listen", "127.0.0.1:0", "--allow-loopback-admin", "false"])
        .arg("--data-dir")
        .arg(data.path())
        .arg("--ready-file")
        .arg(&ready)
        .env("IPEVENT_ADMIN_TOKEN", "from-the-environment")
        .spawn()
        .unwrap();
    let addr = ipevent_testkit::wait_for("the ready file", || std::fs::read_to_string(&ready).ok())
        .trim()
        .to_string();
    let url = format!("http://{addr}/events");
    assert_eq!(http("DELETE", &url, &[], None).status, 401);
    assert_eq!(
        http(
            "DELETE",
            &url,
            &[("Authorization", "Bearer from-the-environment")],
            None
        )
        .status,
        200
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn metrics_count_requests_by_route_and_status() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);
    api.get("/");
    api.get(&format!("/events/{UNKNOWN_SHA}"));
    api.get(&format!("/events/{UNKNOWN_SHA}"));
    api.get("/events/nope");
    api.get("/what");
    let text = api.metrics();
    let requests = |labels: &str| metric(&text, &format!("ipevent_api_requests_total{{{labels}}}"));
    assert_eq!(
        requests("route=\"/\",method=\"GET\",status=\"200\""),
        Some(1.0)
    );
    assert_eq!(
        requests("route=\"/events/{sha}\",method=\"GET\",status=\"404\""),
        Some(2.0)
    );
    assert_eq!(
        requests("route=\"/events/{sha}\",method=\"GET\",status=\"400\""),
        Some(1.0)
    );
    assert_eq!(
        requests("route=\"unmatched\",method=\"GET\",status=\"404\""),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "ipevent_api_request_duration_seconds_count{route=\"/events/{sha}\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "ipevent_api_sync_rounds_total{result=\"none\"}"),
        Some(2.0)
    );
    assert_eq!(metric(&text, "ipevent_api_sync_failures_total"), Some(0.0));
    assert!(text.contains("# TYPE ipevent_api_request_duration_seconds histogram"));
}

#[test]
fn sigterm_and_sigint_stop_cleanly() {
    for signal in ["TERM", "INT"] {
        let data = tempfile::tempdir().unwrap();
        let mut api = Api::start(data.path(), &[]);
        let status = api.stop_with(signal);
        assert!(status.success(), "SIG{signal}: {status}");
        assert!(
            std::net::TcpStream::connect(api.addr).is_err(),
            "still listening after SIG{signal}"
        );
    }
}

/// Runs the API with `args` (and no ready file), expecting it to exit at once.
fn run_failing(args: &[&str]) -> (i32, String) {
    let mut command = Command::new(bin("ipevent-api"));
    common::clear_ipevent_env(&mut command);
    let output = command.args(args).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    (output.status.code().expect("exited, not killed"), stderr)
}

#[test]
fn bad_settings_are_one_line_errors() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    for (args, needle) in [
        (vec!["--listen", "nonsense"], "invalid socket address"),
        (
            vec!["--listen", "127.0.0.1:0", "--writer-id", "../x"],
            "writer id",
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--sync-timeout-ms", "0"],
            "sync-timeout-ms",
        ),
        (
            vec!["--allow-loopback-admin", "maybe"],
            "allow-loopback-admin",
        ),
        (vec!["--no-such-flag"], "no-such-flag"),
    ] {
        let mut args = args.clone();
        args.extend(["--data-dir", dir]);
        let (code, stderr) = run_failing(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn runtime_failures_exit_1_with_context() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);

    // The port is taken.
    let other = tempfile::tempdir().unwrap();
    let taken = api.addr.to_string();
    let (code, stderr) = run_failing(&[
        "--listen",
        &taken,
        "--data-dir",
        other.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("binding {taken}")), "{stderr}");
    assert_eq!(
        stderr
            .trim()
            .lines()
            .filter(|l| l.starts_with("ipevent-api:"))
            .count(),
        1,
        "{stderr}"
    );

    // Another API already writes as this writer id in this data dir.
    let (code, stderr) = run_failing(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is in use by another process"), "{stderr}");

    // The data dir is a file.
    let file = other.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let (code, stderr) = run_failing(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("preparing the data dir"), "{stderr}");
}

#[test]
fn root_runs_with_one_warning_unless_refused() {
    let as_root = ipevent_core::sys::effective_uid() == 0;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    if as_root {
        let (code, stderr) = run_failing(&[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir,
            "--refuse-root",
        ]);
        assert_eq!(code, 1, "{stderr}");
        assert_eq!(
            stderr.trim_end(),
            "ipevent-api: refusing to run as root (--refuse-root): run ipevent-api as an \
             unprivileged user, such as the packaged `ipevent` user"
        );
    }

    let ready = data.path().join("ready");
    let mut command = Command::new(bin("ipevent-api"));
    common::clear_ipevent_env(&mut command);
    let child = command
        .args(["--listen", "127.0.0.1:0", "--data-dir", dir])
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ipevent_testkit::wait_for("the ready file", || std::fs::read_to_string(&ready).ok());
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("running as root"))
        .count();
    assert_eq!(warnings, usize::from(as_root), "{stderr}");
}
