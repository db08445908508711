//! `aggregate::Pending::add`, nanoseconds per event, on batches of 1024 records (the size an
//! ingest thread hands to the writer):
//! - `3_apps_x_17_addrs`: the lookout shape; every record hits an entry already held.
//! - `1m_apps_held`: a million apps already pending, records spread over all of them, so
//!   nearly every lookup misses the CPU caches.
//! - `1024_new_apps`: every record is an app not yet pending (first event of an app).
//!
//! `cargo bench -p ipevent-core --bench aggregate`

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ipevent_core::aggregate::{Pending, Record};
use ipevent_core::AppSha;

/// Records per batch: the receiver's `BATCH_RECORDS`.
const BATCH_RECORDS: usize = 1024;

/// Apps held in the many-apps case.
const MANY_APPS: u64 = 1_000_000;

/// Addresses per app in the many-apps case (the test client's random scenario sends an app
/// the 14 hosts of its /28 and a few outsiders).
const MANY_APPS_ADDRS: u64 = 4;

/// Distinct batches cycled through in the many-apps case, so the records are not the same
/// few cache lines every iteration.
const MANY_APPS_BATCHES: usize = 256;

/// A well-mixed 64-bit function of `x` (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn sha(index: u64) -> AppSha {
    let mut bytes = [0u8; 32];
    for (k, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(index * 4 + k as u64).to_le_bytes());
    }
    AppSha(bytes)
}

fn record(app: AppSha, ip: u32, i: u64) -> Record {
    Record {
        app,
        ip,
        unix_secs: 1_800_000_000 + (i / 300_000) as u32,
    }
}

fn lookout_batch() -> Vec<Record> {
    let apps = [sha(1), sha(2), sha(3)];
    (0..BATCH_RECORDS as u64)
        .map(|i| {
            let r = mix(i);
            let ip = 0x0a00_0010 + (r % 17) as u32;
            record(apps[((r >> 32) % 3) as usize], ip, i)
        })
        .collect()
}

fn many_apps_batches() -> Vec<Vec<Record>> {
    (0..MANY_APPS_BATCHES)
        .map(|b| {
            (0..BATCH_RECORDS as u64)
                .map(|i| {
                    let r = mix((b * BATCH_RECORDS) as u64 + i + (1 << 40));
                    let app = r % MANY_APPS;
                    let ip = (mix(app) as u32 & !0xf) | (1 + (r >> 40) % MANY_APPS_ADDRS) as u32;
                    record(sha(app), ip, i)
                })
                .collect()
        })
        .collect()
}

fn bench_add(c: &mut Criterion) {
    let mut group = c.benchmark_group("aggregate");
    group.throughput(Throughput::Elements(BATCH_RECORDS as u64));

    let batch = lookout_batch();
    let mut pending = Pending::default();
    pending.add(&batch);
    assert_eq!(pending.apps(), 3);
    assert_eq!(pending.entries(), 3 * 17);
    group.bench_function("3_apps_x_17_addrs", |b| {
        b.iter(|| pending.add(black_box(&batch)))
    });

    let batches = many_apps_batches();
    let mut pending = Pending::default();
    for app in 0..MANY_APPS {
        let base = mix(app) as u32 & !0xf;
        let held: Vec<Record> = (1..=MANY_APPS_ADDRS)
            .map(|a| record(sha(app), base | a as u32, 0))
            .collect();
        pending.add(&held);
    }
    assert_eq!(pending.apps() as u64, MANY_APPS);
    let entries = pending.entries();
    let mut next = 0;
    group.bench_function("1m_apps_held", |b| {
        b.iter(|| {
            pending.add(black_box(&batches[next]));
            next = (next + 1) % batches.len();
        })
    });
    assert_eq!(
        pending.entries(),
        entries,
        "the many-apps case only hits held entries"
    );
    drop(pending);

    let fresh: Vec<Record> = (0..BATCH_RECORDS as u64)
        .map(|i| record(sha(i + (1 << 32)), 0x0a00_0001, i))
        .collect();
    group.bench_function("1024_new_apps", |b| {
        b.iter_batched_ref(
            Pending::default,
            |pending| pending.add(black_box(&fresh)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_add);
criterion_main!(benches);
