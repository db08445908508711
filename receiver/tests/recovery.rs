//! Recovery from what a crash and an unlucky operator leave behind: stale or missing run state,
//! a journal of another version, a full journal at start. Real binaries, real files, real
//! signals.

use std::path::Path;

use ipevent_core::aggregate::Record;
use ipevent_core::journal::{self, Journal};
use ipevent_core::{AppSha, DataDir};
use ipevent_testkit::{
    report_count, run_receiver_to_exit, send_events, sender, stdout_json, Receiver,
};

const LONG_FLUSH: &[&str] = &["--flush-interval-ms", "600000"];

fn count_of(data_dir: &Path, app: &AppSha) -> u64 {
    report_count(&ipevent_testkit::query(data_dir, &[&app.to_hex()]))
}

/// A receiver flushes four epochs of ten events for one app; `spoil` then stops it and damages
/// what it left (its run state, its journal). The next run accepts 100 events for that app and
/// 50 for a new one and is killed before it flushes them; the run after must store each event
/// exactly once, whatever `spoil` did.
fn nothing_lost_after(before: impl FnOnce(&DataDir), spoil: impl FnOnce(&DataDir, &mut Receiver)) {
    let old = AppSha([0x5a; 32]);
    let new = AppSha([0xa5; 32]);
    let tx = sender();
    let mut rx = Receiver::start(LONG_FLUSH);
    let dir = rx.take_tmp().unwrap();
    let data = rx.data.clone();
    let mut before = Some(before);
    for round in 0..4u32 {
        if round == 1 {
            before.take().unwrap()(&data);
        }
        send_events(&tx, rx.addr, &old, round * 10..round * 10 + 10);
        let out = rx.query(&["--sync", &old.to_hex()]);
        assert_eq!(stdout_json(&out)["count"], u64::from(round * 10 + 10));
    }
    spoil(&data, &mut rx);

    let mut rx = Receiver::start_in(dir.path(), LONG_FLUSH);
    send_events(&tx, rx.addr, &old, 1000..1100);
    send_events(&tx, rx.addr, &new, 0..50);
    rx.wait_stats("every event to be accepted", |s| s.events_accepted == 150);
    assert!(!rx.stop_with(libc::SIGKILL).success());

    let mut rx = Receiver::start_in(dir.path(), LONG_FLUSH);
    assert_eq!(rx.stats().unwrap().events_replayed, 150);
    assert_eq!(count_of(dir.path(), &old), 140, "the old app, once each");
    assert_eq!(count_of(dir.path(), &new), 50, "the new app, once each");
    // And once more after a clean stop: nothing replayed twice.
    rx.stop();
    let rx = Receiver::start_in(dir.path(), LONG_FLUSH);
    assert_eq!(rx.stats().unwrap().events_replayed, 0);
    assert_eq!(count_of(dir.path(), &old), 140);
    drop(rx);
}

fn state_path(data: &DataDir) -> std::path::PathBuf {
    data.state_path("test")
}

#[test]
fn a_deleted_run_state_loses_nothing() {
    nothing_lost_after(
        |_| {},
        |data, rx| {
            rx.stop();
            std::fs::remove_file(state_path(data)).unwrap();
        },
    );
}

#[test]
fn an_old_copy_of_the_run_state_loses_nothing() {
    let copy = tempfile::NamedTempFile::new().unwrap();
    let saved = copy.path().to_path_buf();
    let restore = saved.clone();
    nothing_lost_after(
        move |data| {
            std::fs::copy(state_path(data), &saved).unwrap();
        },
        move |data, rx| {
            rx.stop();
            std::fs::copy(&restore, state_path(data)).unwrap();
        },
    );
}

#[test]
fn a_run_state_that_could_not_be_written_loses_nothing() {
    nothing_lost_after(
        |data| {
            // Its replacement is written beside it first: a directory there makes that fail,
            // as a full disk would, while the logs are still written.
            std::fs::create_dir(data.receiver_dir("test").join("state.tmp")).unwrap();
        },
        |_, rx| {
            assert!(!rx.stop_with(libc::SIGKILL).success());
        },
    );
}

#[test]
fn a_deleted_run_state_and_journal_lose_nothing() {
    nothing_lost_after(
        |_| {},
        |data, rx| {
            rx.stop();
            std::fs::remove_file(state_path(data)).unwrap();
            std::fs::remove_file(data.journal_path("test")).unwrap();
        },
    );
}

#[test]
fn a_journal_of_another_version_stops_the_start_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    std::fs::create_dir_all(data.receiver_dir("test")).unwrap();
    let path = data.journal_path("test");
    let mut bytes = vec![0u8; journal::MIN_JOURNAL_BYTES as usize];
    bytes[0..4].copy_from_slice(b"IPEJ");
    bytes[4..8].copy_from_slice(&(journal::VERSION + 1).to_le_bytes());
    bytes[8..16].copy_from_slice(&56u64.to_le_bytes());
    bytes[4096..4200].fill(0x77);
    std::fs::write(&path, &bytes).unwrap();

    let out = run_receiver_to_exit(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("ipevent-receiver: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(line.contains(&path.display().to_string()), "{line}");
    assert!(line.contains("version"), "{line}");
    assert!(line.contains("move the file away"), "{line}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the journal is left as it was"
    );

    // Something that is no journal at all is refused the same way.
    bytes[0..4].copy_from_slice(b"\x7fELF");
    std::fs::write(&path, &bytes).unwrap();
    let out = run_receiver_to_exit(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an ipevent journal"));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

/// Peak resident memory of process `pid`, in bytes.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn replaying_a_full_journal_keeps_memory_low() {
    const JOURNAL_BYTES: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    std::fs::create_dir_all(data.receiver_dir("test")).unwrap();
    let apps: Vec<AppSha> = (1..=4u8).map(|i| AppSha([i; 32])).collect();
    let mut journal = Journal::open(&data.journal_path("test"), JOURNAL_BYTES).unwrap();
    let mut batch = Vec::with_capacity(1024);
    let mut written = 0u64;
    loop {
        batch.clear();
        for i in 0..1024u32 {
            batch.push(Record {
                app: apps[(i % 4) as usize],
                ip: i % 256,
                unix_secs: 1_700_000_000,
            });
        }
        if !journal.append(1, &batch) {
            break;
        }
        written += batch.len() as u64;
    }
    drop(journal);
    assert!(written > 1_500_000, "{written}");

    let journal_bytes = JOURNAL_BYTES.to_string();
    let mut rx = Receiver::start_in(dir.path(), &["--journal-bytes", &journal_bytes]);
    let stats = rx.wait_stats("the replay to be flushed", |s| {
        s.events_replayed == written && s.events_pending == 0
    });
    let peak = peak_rss_bytes(rx.pid());
    eprintln!("peak resident memory after the replay: {} KiB", peak >> 10);
    // Reading the journal whole took its size twice over.
    assert!(
        peak < 40 << 20,
        "peak resident memory {} MiB after replaying a {} MiB journal",
        peak >> 20,
        JOURNAL_BYTES >> 20
    );
    assert_eq!(stats.events_flushed, written);
    assert_eq!(count_of(dir.path(), &apps[0]), written / 4);
    rx.stop();
}

fn list_counts(data_dir: &Path) -> Vec<(String, u64)> {
    let out = ipevent_testkit::query(data_dir, &["list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["app_sha256"].as_str().unwrap().to_string(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn queries_count_what_a_stopped_receiver_journaled_exactly_once() {
    let stored = AppSha([0x61; 32]);
    let journaled_only = AppSha([0x62; 32]);
    let expected = vec![(stored.to_hex(), 40), (journaled_only.to_hex(), 20)];
    let tx = sender();
    let mut rx = Receiver::start(LONG_FLUSH);
    let dir = rx.take_tmp().unwrap();
    send_events(&tx, rx.addr, &stored, 0..10);
    let out = rx.query(&["--sync", &stored.to_hex()]);
    assert_eq!(stdout_json(&out)["count"], 10);
    send_events(&tx, rx.addr, &stored, 100..130);
    send_events(&tx, rx.addr, &journaled_only, 0..20);
    rx.wait_stats("every event to be accepted", |s| s.events_accepted == 60);
    assert!(!rx.stop_with(libc::SIGKILL).success());

    // No receiver runs: what its journal holds beyond its logs is counted, once.
    for _ in 0..2 {
        assert_eq!(count_of(dir.path(), &stored), 40);
        assert_eq!(count_of(dir.path(), &journaled_only), 20);
        assert_eq!(list_counts(dir.path()), expected);
    }
    // The restart replays it into the logs: still exact while it runs and after it stops.
    let mut rx = Receiver::start_in(dir.path(), LONG_FLUSH);
    assert_eq!(rx.stats().unwrap().events_replayed, 50);
    assert_eq!(count_of(dir.path(), &stored), 40);
    assert_eq!(list_counts(dir.path()), expected);
    rx.stop();
    assert_eq!(count_of(dir.path(), &journaled_only), 20);
    assert_eq!(list_counts(dir.path()), expected);

    // A crash in the middle of a flush: one app is in its log and still in the journal.
    let mut rx = Receiver::start_in(
        dir.path(),
        &[LONG_FLUSH[0], LONG_FLUSH[1], "--test-crash-after-apps", "1"],
    );
    send_events(&tx, rx.addr, &stored, 200..205);
    send_events(&tx, rx.addr, &journaled_only, 200..205);
    rx.wait_stats("every event to be accepted", |s| s.events_accepted == 10);
    let _ = rx.query(&["--sync", "list"]);
    assert!(!rx.wait_exit().success(), "the hook aborts the flush");
    assert_eq!(count_of(dir.path(), &stored), 45, "never twice");
    assert_eq!(count_of(dir.path(), &journaled_only), 25, "never twice");
}
