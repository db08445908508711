//! Durability: nothing accepted is lost or counted twice, whatever stops the receiver, and
//! damaged logs are read and repaired correctly. Real binaries, real files, real signals.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use ipevent_testkit::{
    report_count, run_receiver_to_exit, stdout_json, PacedSender, Receiver, Rng,
};

/// Longest datagram these tests send.
const DATAGRAM_MAX_BYTES: usize = 100;

/// Stats often, so that a [`PacedSender`] waits little between windows.
const FAST_STATS: [&str; 2] = ["--stats-interval-ms", "10"];

fn send_events(tx: &mut PacedSender, events: &[(AppSha, u32)]) {
    for (app, ip) in events {
        tx.send(&wire::encode_to_vec(&IpEvent { app: *app, ip: *ip }));
    }
}

/// `n` events spread over `apps` random apps.
fn random_events(rng: &mut Rng, apps: usize, n: usize) -> Vec<(AppSha, u32)> {
    let list: Vec<AppSha> = (0..apps).map(|_| rng.app()).collect();
    (0..n)
        .map(|i| (list[i % apps], rng.next_u64() as u32))
        .collect()
}

#[test]
fn sigkill_between_flushes_loses_nothing_accepted() {
    let mut rng = Rng::new(0xdead);
    let flags = ["--flush-interval-ms", "60000", FAST_STATS[0], FAST_STATS[1]];
    let mut rx = Receiver::start(&flags);
    let dir = rx.take_tmp().unwrap();
    let mut expected = 0u64;
    for round in 0..3 {
        let events = random_events(&mut rng, 5, 3000);
        let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
        send_events(&mut tx, &events);
        tx.wait_read();
        expected += events.len() as u64;
        let n = events.len() as u64;
        rx.wait_stats("every event to be accepted", |s| s.events_accepted == n);
        let status = rx.stop_with(libc::SIGKILL);
        assert!(!status.success());
        rx = Receiver::start_in(dir.path(), &flags);
        let stats = rx.stats().unwrap();
        assert!(
            !stats.last_stop_clean,
            "round {round}: the kill went unnoticed"
        );
        assert_eq!(
            stats.events_replayed, n,
            "round {round}: replayed from the journal"
        );
        assert_eq!(rx.stored_total(), expected, "round {round}");
    }
    rx.stop();
    let rx = Receiver::start_in(dir.path(), &[]);
    assert_eq!(
        rx.stats().unwrap().events_replayed,
        0,
        "a clean stop leaves nothing to replay"
    );
    assert_eq!(rx.stored_total(), expected);
}

#[test]
fn a_crash_in_the_middle_of_a_flush_counts_nothing_twice() {
    let mut rng = Rng::new(0xf1);
    let apps = 400;
    let events = random_events(&mut rng, apps, 4000);
    let mut rx = Receiver::start(&[
        "--flush-interval-ms",
        "60000",
        "--test-crash-after-apps",
        "150",
        FAST_STATS[0],
        FAST_STATS[1],
    ]);
    let dir = rx.take_tmp().unwrap();
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    send_events(&mut tx, &events);
    tx.wait_read();
    rx.wait_stats("every event to be accepted", |s| s.events_accepted == 4000);
    // A sync starts the flush; the hook aborts the receiver after 150 of the 400 apps.
    let out = rx.query(&["--sync", "list"]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).is_empty(),
        "the sync cannot have been answered"
    );
    let status = rx.wait_exit();
    assert!(!status.success(), "the hook aborts");
    let logs = std::fs::read_dir(dir.path().join("events"))
        .unwrap()
        .flat_map(|fan| std::fs::read_dir(fan.unwrap().path()).unwrap())
        .count();
    assert!(
        logs > 0 && logs < apps,
        "the crash landed mid-flush ({logs} of {apps} apps written)"
    );
    // Queries already report every accepted event: the rest is read from the journal.
    assert_eq!(rx.stored_total(), 4000);

    // Twice more: restart, crash again in the replay's own flush, then finish.
    let out = run_receiver_to_exit(dir.path(), &["--test-crash-after-apps", "100"]);
    assert!(
        !out.status.success(),
        "the hook aborts the replay's flush too"
    );
    let rx = Receiver::start_in(dir.path(), &["--flush-interval-ms", "60000"]);
    let stats = rx.stats().unwrap();
    assert!(
        stats.events_replayed > 0 && stats.events_replayed < 4000,
        "{}",
        stats.events_replayed
    );
    assert_eq!(rx.stored_total(), 4000, "every event exactly once");
    let mut per_app = std::collections::HashMap::<AppSha, u64>::new();
    for (app, _) in &events {
        *per_app.entry(*app).or_default() += 1;
    }
    for (app, n) in per_app {
        assert_eq!(report_count(&rx.query(&[&app.to_hex()])), n, "app {app}");
    }
}

fn only_log(dir: &Path) -> PathBuf {
    let mut logs = Vec::new();
    for fan in std::fs::read_dir(dir.join("events")).unwrap() {
        let fan = fan.unwrap();
        if fan.file_name() == "index" || fan.file_name() == "addr" {
            continue; // the writers' app and address indexes
        }
        for app in std::fs::read_dir(fan.path()).unwrap() {
            for log in std::fs::read_dir(app.unwrap().path()).unwrap() {
                logs.push(log.unwrap().path());
            }
        }
    }
    assert_eq!(logs.len(), 1, "{logs:?}");
    logs.pop().unwrap()
}

/// Three flushes of `per_flush` events each for one app, each a block of its own.
fn three_blocks(per_flush: u32) -> (Receiver, tempfile::TempDir, AppSha, PathBuf) {
    let app = AppSha([0x42; 32]);
    let mut rx = Receiver::start(&["--flush-interval-ms", "60000"]);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    let dir = rx.take_tmp().unwrap();
    for round in 0..3u32 {
        let events: Vec<(AppSha, u32)> = (0..per_flush).map(|i| (app, round * 1000 + i)).collect();
        send_events(&mut tx, &events);
        let out = rx.query(&["--sync", &app.to_hex()]);
        assert_eq!(
            stdout_json(&out)["count"],
            u64::from((round + 1) * per_flush)
        );
    }
    rx.stop();
    let log = only_log(dir.path());
    (rx, dir, app, log)
}

#[test]
fn a_torn_tail_is_skipped_by_queries_and_repaired_by_the_receiver() {
    let (rx, dir, app, log) = three_blocks(10);
    let len = std::fs::metadata(&log).unwrap().len();
    // Cut the last block (32 + 10 * 16 bytes) in half.
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(len - 96)
        .unwrap();
    let out = rx.query(&[&app.to_hex()]);
    assert_eq!(
        stdout_json(&out)["count"],
        20,
        "only the two whole blocks count"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unverified tail"));

    let rx = Receiver::start_in(dir.path(), &["--flush-interval-ms", "60000"]);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    send_events(&mut tx, &[(app, 7), (app, 8)]);
    let out = rx.query(&["--sync", &app.to_hex()]);
    assert_eq!(stdout_json(&out)["count"], 22);
    assert!(
        out.stderr.is_empty(),
        "repaired: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_flipped_byte_stops_counting_at_its_block_and_the_receiver_rewrites_the_log() {
    let (rx, dir, app, log) = three_blocks(10);
    let block = 32 + 10 * 16;
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[block + 40] ^= 0x01; // a record of the second block
    std::fs::write(&log, &bytes).unwrap();
    assert_eq!(
        report_count(&rx.query(&[&app.to_hex()])),
        10,
        "the first block only"
    );

    let rx = Receiver::start_in(dir.path(), &["--flush-interval-ms", "60000"]);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    send_events(&mut tx, &[(app, 9)]);
    let out = rx.query(&["--sync", &app.to_hex()]);
    assert_eq!(
        stdout_json(&out)["count"],
        11,
        "the damaged blocks are gone, new events count"
    );
    assert!(out.stderr.is_empty());
    // The log now appends cleanly.
    send_events(&mut tx, &[(app, 10)]);
    assert_eq!(
        stdout_json(&rx.query(&["--sync", &app.to_hex()]))["count"],
        12
    );
}

/// A small tmpfs, unmounted when dropped.
struct SmallFs {
    path: PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Result<SmallFs, String> {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallFs {
            path,
            _parent: parent,
        })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the file system until a write fails; returns the filler.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
    path
}

#[test]
fn a_full_disk_holds_events_back_and_they_arrive_when_space_returns() {
    let fs = match SmallFs::mount("8m") {
        Ok(fs) => fs,
        Err(reason) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI must be able to run the disk-full test: {reason}");
            }
            eprintln!("skipped: needs root to mount a tmpfs ({reason})");
            return;
        }
    };
    let data = fs.path.join("data");
    let mut rx = Receiver::start_in(
        &data,
        &[
            "--flush-interval-ms",
            "20",
            "--journal-bytes",
            "2000000",
            "--min-free-bytes",
            "0",
            "--min-free-inodes",
            "0",
            FAST_STATS[0],
            FAST_STATS[1],
        ],
    );
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    let filler = fill(&fs.path);
    let mut rng = Rng::new(5);
    let events = random_events(&mut rng, 300, 6000);
    send_events(&mut tx, &events);
    let stats = rx.wait_stats("flushes to fail", |s| {
        s.flush_errors > 0 && s.events_accepted == 6000
    });
    assert!(stats.events_pending > 0, "{stats:?}");
    // Still receiving while the disk is full.
    send_events(&mut tx, &events[..100]);
    rx.wait_stats("more events while full", |s| s.events_accepted == 6100);

    std::fs::remove_file(filler).unwrap();
    let stats = rx.wait_stats("the backlog to reach the store", |s| {
        s.events_pending == 0 && s.events_flushed == 6100
    });
    assert_eq!(stats.kernel_drops, 0);
    assert_eq!(rx.stored_total(), 6100);
    rx.stop();
}

#[test]
fn a_read_only_data_dir_holds_events_back_until_it_is_writable_again() {
    let mut rx = Receiver::start(&["--flush-interval-ms", "20", FAST_STATS[0], FAST_STATS[1]]);
    let mut tx = PacedSender::new(&rx, DATAGRAM_MAX_BYTES);
    let events_dir = rx.data.events_dir();
    let mut rng = Rng::new(6);
    let first = random_events(&mut rng, 50, 1000);
    send_events(&mut tx, &first);
    rx.wait_stats("the first events to be stored", |s| {
        s.events_flushed == 1000
    });

    // A read-only bind mount over the tree: writes there fail with EROFS, as on a file
    // system remounted read-only.
    let mount = |args: &[&str]| {
        Command::new("mount")
            .args(args)
            .arg(&events_dir)
            .arg(&events_dir)
            .output()
            .map_err(|e| e.to_string())
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
                }
            })
    };
    if let Err(reason) = mount(&["--bind"]).and_then(|()| mount(&["-o", "remount,bind,ro"])) {
        let _ = Command::new("umount").arg(&events_dir).status();
        if std::env::var_os("CI").is_some() {
            panic!("CI must be able to run the read-only test: {reason}");
        }
        eprintln!("skipped: needs root for a read-only bind mount ({reason})");
        return;
    }
    let more = random_events(&mut rng, 50, 2000);
    send_events(&mut tx, &more);
    let stats = rx.wait_stats("flushes to fail", |s| {
        s.flush_errors > 0 && s.events_accepted == 3000
    });
    assert!(stats.events_pending > 0);
    assert_eq!(rx.stored_total(), 1000, "nothing new could be written");

    let status = Command::new("umount").arg(&events_dir).status().unwrap();
    assert!(status.success());
    let stats = rx.wait_stats("the backlog to reach the store", |s| {
        s.events_pending == 0 && s.events_flushed == 3000
    });
    assert_eq!(stats.kernel_drops, 0);
    assert_eq!(rx.stored_total(), 3000);
    rx.stop();
}
