//! `--retain-days N`: the receiver's background sweep removes every app whose newest event is
//! older than N days, counts it (`apps_expired`) and leaves every other app alone. The store
//! is seeded with crafted arrival times (a stopped writer's logs), so nothing waits for days.

use std::net::Ipv4Addr;

use ipevent_core::retention::SECS_PER_DAY;
use ipevent_core::store::{AddrStats, AppendBlocks, StoreWriter};
use ipevent_core::wire::{self, IpEvent};
use ipevent_core::{AppSha, DataDir};
use ipevent_testkit::{sender, stdout_json, Receiver};

fn app(byte: u8) -> AppSha {
    AppSha([byte; 32])
}

fn seen(unix: u64) -> AddrStats {
    let unix = u32::try_from(unix).unwrap();
    AddrStats {
        count: 2,
        first_seen: unix - 100,
        last_seen: unix,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn the_sweep_removes_only_apps_whose_newest_event_is_older_than_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    data.create().unwrap();
    let now = now_unix();
    let days_ago = |days: u64| now - days * SECS_PER_DAY;
    let (old, mixed, recent, live) = (app(0x01), app(0x02), app(0x03), app(0x04));
    // What an earlier receiver, stopped since, wrote.
    let mut seed = StoreWriter::new(data.clone(), "seed", false).unwrap();
    seed.append(&old, 1, &[(1, seen(days_ago(40))), (2, seen(days_ago(31)))])
        .unwrap();
    // One address long silent, another recent: the app's newest event decides.
    seed.append(
        &mixed,
        1,
        &[(1, seen(days_ago(90))), (2, seen(days_ago(2)))],
    )
    .unwrap();
    seed.append(&recent, 1, &[(3, seen(days_ago(29)))]).unwrap();
    drop(seed);

    let mut rx = Receiver::start_in(
        dir.path(),
        &["--retain-days", "30", "--stats-interval-ms", "20"],
    );
    // Ingest goes on while the sweep runs.
    let datagram = wire::encode_to_vec(&IpEvent {
        app: live,
        ip: u32::from(Ipv4Addr::new(10, 0, 0, 1)),
    });
    sender().send_to(&datagram, rx.addr).unwrap();
    let stats = rx.wait_stats("the sweep to remove the old app", |s| {
        s.apps_expired == 1 && s.events_accepted == 1
    });
    assert_eq!(stats.apps_expired, 1);

    let out = rx.query(&["--sync", &old.to_hex()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    for (kept, count) in [(mixed, 4), (recent, 2), (live, 1)] {
        let out = rx.query(&[&kept.to_hex()]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(stdout_json(&out)["count"], count, "{kept}");
    }
    let out = rx.query(&["list", "--limit", "0"]);
    let listed: Vec<String> = stdout_json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["app_sha256"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(!listed.contains(&old.to_hex()), "{listed:?}");
    rx.stop();
    // The count is in the stats file the receiver leaves at exit too.
    assert_eq!(rx.stats().unwrap().apps_expired, 1);
}
