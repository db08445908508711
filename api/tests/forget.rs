//! `DELETE /events/{sha}` over real HTTP, with a real receiver: one app forgotten everywhere
//! (the receiver's memory and journal, the API's own posted events), the others untouched;
//! input and authorisation checked as for `DELETE /events`.

mod common;

use common::{app, datagram, http, report_json, send_events, Api, ApiHttp};
use ipevent_testkit::{query, sender, wait_for, Receiver};

/// The receiver flushes only every 60 s: every read below went through a sync.
const SLOW_FLUSH: [&str; 4] = ["--flush-interval-ms", "60000", "--stats-interval-ms", "20"];

const PATIENT_API: [&str; 4] = [
    "--sync-timeout-ms",
    "60000",
    "--request-timeout-ms",
    "120000",
];

fn delete(api: &Api, path: &str, headers: &[(&str, &str)]) -> common::Reply {
    http("DELETE", &api.url(path), headers, None)
}

#[test]
fn delete_one_app_forgets_it_everywhere_and_keeps_what_follows() {
    let mut rx = Receiver::start(&SLOW_FLUSH);
    let api = Api::start(rx.data.root(), &PATIENT_API);
    let (gone, kept) = (app(0x51), app(0x62));
    let socket = sender();
    send_events(
        &socket,
        rx.addr,
        &[(gone, "10.1.0.1"), (gone, "9.9.9.9"), (kept, "10.2.0.1")],
    );
    rx.wait_stats("the datagrams", |s| s.events_accepted == 3);
    assert_eq!(api.post(&datagram(&gone, "10.1.0.2")).status, 202);
    assert_eq!(
        api.report(&gone),
        report_json(3, &["10.1.0.1", "10.1.0.2"], &["9.9.9.9"])
    );

    let reply = delete(&api, &format!("/events/{gone}"), &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.json(),
        serde_json::json!({"forgotten": gone.to_hex(), "found": true, "receivers": ["test"]})
    );
    assert_eq!(api.get(&format!("/events/{gone}")).status, 404);
    assert_eq!(api.report(&kept), report_json(1, &["10.2.0.1"], &[]));

    // Everything after the answer counts, by UDP and by POST.
    send_events(&socket, rx.addr, &[(gone, "10.1.0.5")]);
    rx.wait_stats("the datagram after the forget", |s| s.events_accepted == 4);
    assert_eq!(api.post(&datagram(&gone, "10.1.0.6")).status, 202);
    assert_eq!(
        api.report(&gone),
        report_json(2, &["10.1.0.5", "10.1.0.6"], &[])
    );
    // Forgetting twice is no error; the second time there is nothing left to find.
    let reply = delete(&api, &format!("/events/{}", app(0x77)), &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["found"], false);

    // While the API runs (a writer without a control socket), the CLI cannot reach it.
    let out = query(rx.data.root(), &["forget", &kept.to_hex()]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DELETE /events/<sha>"), "{stderr}");
    assert_eq!(api.report(&kept), report_json(1, &["10.2.0.1"], &[]));
    rx.stop();
}

#[test]
fn delete_one_app_checks_the_sha_and_the_admin_token() {
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
    let path = format!("/events/{}", app(3));
    let reply = delete(&api, &path, &[]);
    assert_eq!(reply.status, 401, "{reply:?}");
    let reply = delete(&api, &path, &[("Authorization", "Bearer wrong")]);
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(api.get(&path).status, 200, "nothing was forgotten");

    let token = [("Authorization", "Bearer s3cret-s3cret-s3cret")];
    for bad in ["not-a-sha", "abc", &"g".repeat(64)] {
        let reply = delete(&api, &format!("/events/{bad}"), &token);
        assert_eq!(reply.status, 400, "{bad}: {reply:?}");
        assert!(!reply.error().is_empty());
    }
    let reply = delete(&api, &path, &token);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["found"], true);
    assert_eq!(api.get(&path).status, 404);
    // The moved directory is deleted before the answer.
    wait_for("the trash to be empty", || {
        let left = std::fs::read_dir(data.path().join("trash")).ok()?.count();
        (left == 0).then_some(())
    });
}

#[test]
fn a_reset_empties_the_journal_of_a_stopped_receiver() {
    let mut rx = Receiver::start(&SLOW_FLUSH);
    let dir = rx.take_tmp().unwrap();
    let before = app(0x81);
    let socket = sender();
    send_events(
        &socket,
        rx.addr,
        &[(before, "10.1.0.1"), (before, "10.1.0.2")],
    );
    rx.wait_stats("the datagrams", |s| s.events_accepted == 2);
    assert!(!rx.stop_with(libc::SIGKILL).success());
    let api = Api::start(dir.path(), &PATIENT_API);
    // The stopped receiver's accepted events are counted from its journal...
    assert_eq!(
        api.report(&before),
        report_json(2, &["10.1.0.1", "10.1.0.2"], &[])
    );
    assert_eq!(api.reset()["reset"], true);
    // ...and not after the reset, nor when it starts again and replays its journal.
    assert_eq!(api.get(&format!("/events/{before}")).status, 404);
    let mut rx = Receiver::start_in(dir.path(), &SLOW_FLUSH);
    assert_eq!(rx.stats().unwrap().events_replayed, 0);
    assert_eq!(api.get(&format!("/events/{before}")).status, 404);
    rx.stop();
}
