//! The address index answers exactly as a scan of every app: on random data over many flushes
//! and merges, with an app left unsettled by a flush cut short, a stopped writer's journal, a
//! forgotten app, a reset, CIDR blocks, and a run that no longer verifies.

use std::time::Duration;

use ipevent_core::aggregate::Record;
use ipevent_core::journal::{Journal, MIN_JOURNAL_BYTES};
use ipevent_core::lookup::{apps_by_address, AddressReport, Cidr};
use ipevent_core::store::addr_index::{candidates, verify_run, writer_addr_dir};
use ipevent_core::store::{
    trash, AppCount, AppData, AppendBlocks, Runs, Store, StoreError, StoreWriter,
};
use ipevent_core::{AddrStats, AppSha, DataDir};

/// The same store read without its address index: every app listed and read.
struct Scan<'a>(&'a DataDir);

impl Store for Scan<'_> {
    fn read_app(&self, app: &AppSha) -> Result<Option<AppData>, StoreError> {
        self.0.read_app(app)
    }

    fn list_apps(&self) -> Result<Vec<AppCount>, StoreError> {
        self.0.list_apps()
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn app(n: u64) -> AppSha {
    let mut sha = [0x3c; 32];
    sha[..8].copy_from_slice(&(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_be_bytes());
    AppSha(sha)
}

/// 10.0.0.0/14: four /16s, so blocks of every size find something.
fn random_ip(rng: &mut Rng) -> u32 {
    0x0a00_0000 | rng.below(1 << 18) as u32 & 0x0003_ff0f
}

/// One flush of `apps` random apps through the receiver's path (begin, runs, end).
fn flush(w: &mut StoreWriter, rng: &mut Rng, epoch: u64, apps: u64, pool: u64) {
    let mut chosen: Vec<AppSha> = (0..apps).map(|_| app(rng.below(pool))).collect();
    chosen.sort_unstable();
    chosen.dedup();
    let mut runs = Runs::default();
    for a in &chosen {
        let mut records: Vec<(u32, AddrStats)> = (0..1 + rng.below(5))
            .map(|_| {
                let at = 1_000 + rng.below(1_000) as u32;
                (
                    random_ip(rng),
                    AddrStats {
                        count: 1 + rng.below(3),
                        first_seen: at,
                        last_seen: at + 5,
                    },
                )
            })
            .collect();
        records.sort_unstable_by_key(|r| r.0);
        records.dedup_by_key(|r| r.0);
        runs.push(a, &records);
    }
    w.begin_flush(&chosen).unwrap();
    for result in w.append_runs(epoch, &runs) {
        result.unwrap();
    }
    w.end_flush().unwrap();
}

/// The addresses and blocks asked about: every address of a few apps, their /24 and /16,
/// an address nobody had, everything.
fn questions(data: &DataDir, rng: &mut Rng) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = vec![
        "10.3.255.255".parse().unwrap(),
        "0.0.0.0/0".parse().unwrap(),
    ];
    let listed = data.list_apps().unwrap();
    for _ in 0..6 {
        if listed.is_empty() {
            break;
        }
        let a = listed[rng.below(listed.len() as u64) as usize].app;
        let Some(read) = data.read_app(&a).unwrap() else {
            continue;
        };
        let ip = read.addrs[rng.below(read.addrs.len() as u64) as usize].0;
        for prefix in [32, 24, 16] {
            out.push(Cidr { net: ip, prefix }.to_string().parse().unwrap());
        }
    }
    out.push("10.1.0.0/16".parse().unwrap());
    out
}

/// The index's answer for every question is the scan's, byte for byte.
fn check(data: &DataDir, rng: &mut Rng, what: &str) {
    for cidr in questions(data, rng) {
        let indexed = apps_by_address(data, cidr).unwrap();
        let scanned = apps_by_address(&Scan(data), cidr).unwrap();
        assert!(
            indexed.unreadable.is_empty(),
            "{what}: {:?}",
            indexed.unreadable
        );
        assert_eq!(
            json(&indexed.report),
            json(&scanned.report),
            "{what}: {cidr}"
        );
    }
}

fn json(report: &AddressReport) -> String {
    serde_json::to_string(report).unwrap()
}

fn runs_of(data: &DataDir, writer: &str) -> Vec<std::path::PathBuf> {
    let mut runs: Vec<_> = std::fs::read_dir(writer_addr_dir(data, writer))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "run"))
        .collect();
    runs.sort();
    runs
}

#[test]
fn the_index_answers_as_a_scan_through_flushes_merges_crashes_forgets_and_resets() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    data.create().unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for id in ["a", "b", "stopped"] {
        ipevent_core::store::create_dir_all(&data.receiver_dir(id)).unwrap();
    }
    // A receiver that ran once and stopped: its app index exists, its logs hold nothing.
    drop(StoreWriter::new(data.clone(), "stopped", false).unwrap());
    let mut a = StoreWriter::new(data.clone(), "a", false).unwrap();
    let mut b = StoreWriter::new(data.clone(), "b", false).unwrap();

    // Many flushes of both writers: runs written and merged as they grow.
    for epoch in 1..=80 {
        flush(&mut a, &mut rng, epoch, 20, 400);
        if epoch % 3 == 0 {
            flush(&mut b, &mut rng, epoch, 40, 400);
        }
    }
    check(&data, &mut rng, "after 80 flushes");
    let runs = runs_of(&data, "a").len();
    assert!((1..=12).contains(&runs), "{runs} runs after 80 flushes");
    // A single address names few apps: the lookup does not read every app.
    let listed = data.list_apps().unwrap();
    let some = data.read_app(&listed[0].app).unwrap().unwrap().addrs[0].0;
    let named = candidates(
        &data,
        Cidr {
            net: some,
            prefix: 32,
        },
    )
    .unwrap()
    .unwrap();
    assert!(
        !named.is_empty() && named.len() < listed.len() / 4,
        "{}",
        named.len()
    );

    // A flush cut short after its logs, before its counts: its apps are unsettled.
    let cut = [app(10_001), app(7)];
    let mut sorted = cut;
    sorted.sort_unstable();
    a.begin_flush(&sorted).unwrap();
    for (i, x) in sorted.iter().enumerate() {
        let stats = AddrStats::one(2_000);
        a.append(x, 81, &[(0x0a02_0001 + i as u32, stats)]).unwrap();
    }
    drop(a);
    check(&data, &mut rng, "a flush cut short");
    assert!(candidates(&data, "10.2.0.1".parse().unwrap())
        .unwrap()
        .unwrap()
        .contains(&sorted[0]));
    // The writer opens again: it settles its index, adding the apps' pairs first.
    let a = StoreWriter::new(data.clone(), "a", false).unwrap();
    check(&data, &mut rng, "settled after the cut flush");

    // A stopped writer's journal: records not in its logs yet, one of them a new app.
    let mut journal = Journal::open(&data.journal_path("stopped"), MIN_JOURNAL_BYTES).unwrap();
    journal.begin_epoch(1, false).unwrap();
    let record = |n: u64, ip: u32| Record {
        app: app(n),
        ip,
        unix_secs: 3_000,
    };
    assert!(journal.append(
        2,
        &[
            record(3, 0x0a03_0303),
            record(20_000, 0x0a03_0303),
            record(5, 0x0a00_0001)
        ]
    ));
    drop(journal);
    check(&data, &mut rng, "a stopped writer's journal");
    assert!(candidates(&data, "10.3.3.3".parse().unwrap())
        .unwrap()
        .is_some_and(|named| named.contains(&app(20_000))));
    let journaled = apps_by_address(&data, "10.3.3.3".parse().unwrap()).unwrap();
    assert!(journaled
        .report
        .apps
        .iter()
        .any(|hit| hit.app_sha256 == app(20_000).to_hex()));

    // A forgotten app: gone from the answer, though its pairs stay in the runs.
    let victim = data.list_apps().unwrap()[0].app;
    drop(a);
    drop(b);
    let done =
        ipevent_core::forget::forget_app(&data, &victim, Duration::from_secs(5), None, || Ok(true))
            .unwrap();
    assert!(done.removed);
    check(&data, &mut rng, "a forgotten app");
    let mut a = StoreWriter::new(data.clone(), "a", false).unwrap();
    let mut b = StoreWriter::new(data.clone(), "b", false).unwrap();
    for epoch in 82..=90 {
        flush(&mut a, &mut rng, epoch, 20, 400);
        flush(&mut b, &mut rng, epoch, 20, 400);
    }
    check(&data, &mut rng, "flushes after the forget");

    // A run that no longer verifies: readers read every app of that writer, still exact;
    // the writer rebuilds the index when it opens.
    let run = runs_of(&data, "a")[0].clone();
    let mut bytes = std::fs::read(&run).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    ipevent_core::store::write_atomic(&run, &bytes).unwrap();
    check(&data, &mut rng, "a corrupt run");
    drop(a);
    let mut a = StoreWriter::new(data.clone(), "a", false).unwrap();
    for run in runs_of(&data, "a") {
        verify_run(&std::fs::read(&run).unwrap()).unwrap();
    }
    check(&data, &mut rng, "the index rebuilt");

    // A reset moves the tree (indexes too) away; the writers start new ones.
    trash::move_tree_away(&data).unwrap();
    a.forget_logs();
    b.forget_logs();
    assert!(apps_by_address(&data, "0.0.0.0/0".parse().unwrap())
        .unwrap()
        .report
        .apps
        .iter()
        .all(|hit| hit.app_sha256 == app(20_000).to_hex()
            || hit.app_sha256 == app(3).to_hex()
            || hit.app_sha256 == app(5).to_hex()));
    for epoch in 91..=110 {
        flush(&mut a, &mut rng, epoch, 20, 100);
        flush(&mut b, &mut rng, epoch, 10, 100);
    }
    check(&data, &mut rng, "after a reset");

    // A writer whose logs predate the index: readers scan it until it is built at open.
    std::fs::remove_dir_all(writer_addr_dir(&data, "b")).unwrap();
    check(&data, &mut rng, "a writer without an address index");
    drop(b);
    let _b = StoreWriter::new(data.clone(), "b", false).unwrap();
    assert!(!runs_of(&data, "b").is_empty());
    check(&data, &mut rng, "the index built from the logs");
}
