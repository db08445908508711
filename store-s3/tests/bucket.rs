//! The engine against a real S3 server (SeaweedFS): writers apply flushes, readers merge them.

use std::sync::Arc;
use std::time::Instant;

use ipevent_core::store::{AppCount, ChangeFeed, Store};
use ipevent_core::{AddrStats, AppSha};
use ipevent_store_s3::{Bucket, S3Error, ShipDb, StoreUrl, LOOK_INTERVAL};
use ipevent_testkit::s3::S3Server;
use ipevent_testkit::WAIT_LIMIT;

fn bucket(server: &S3Server, prefix: &str) -> Arc<Bucket> {
    let env = server.env();
    let url: StoreUrl = server.store_url(prefix).parse().unwrap();
    Arc::new(
        Bucket::from_vars(url, |name| {
            env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
        })
        .unwrap(),
    )
}

fn stats(count: u64, first: u32, last: u32) -> AddrStats {
    AddrStats {
        count,
        first_seen: first,
        last_seen: last,
    }
}

#[test]
fn writers_ship_flushes_and_readers_merge_them() {
    let server = S3Server::start();
    let bucket = bucket(&server, "merge");
    let a = AppSha([0xaa; 32]);
    let b = AppSha([0xbb; 32]);
    assert_eq!(bucket.writer_ids().unwrap(), Vec::<String>::new());
    assert!(bucket.read_app(&a).unwrap().is_none());

    let one = ShipDb::open(Arc::clone(&bucket), "one", "inst-1", "host-1 /data").unwrap();
    assert_eq!(one.shipped_epoch().unwrap(), 0);
    one.apply(
        1,
        &[(a, vec![(10, stats(2, 100, 110)), (20, stats(1, 105, 105))])],
    )
    .unwrap();
    one.apply(
        2,
        &[
            (a, vec![(10, stats(3, 90, 120))]),
            (b, vec![(5, stats(7, 1, 2))]),
        ],
    )
    .unwrap();
    one.publish().unwrap();
    let two = ShipDb::open(Arc::clone(&bucket), "two", "inst-2", "host-2 /data").unwrap();
    two.apply(
        7,
        &[(a, vec![(20, stats(4, 200, 300)), (30, stats(1, 50, 50))])],
    )
    .unwrap();
    two.publish().unwrap();

    assert_eq!(bucket.writer_ids().unwrap(), ["one", "two"]);
    let read = bucket.read_app(&a).unwrap().expect("app a is there");
    assert_eq!(
        read.addrs,
        vec![
            (10, stats(5, 90, 120)),
            (20, stats(5, 105, 300)),
            (30, stats(1, 50, 50)),
        ]
    );
    assert_eq!(read.logs, 2);
    assert_eq!(
        bucket.list_apps().unwrap(),
        vec![
            AppCount {
                app: a,
                count: 11,
                unreadable: None
            },
            AppCount {
                app: b,
                count: 7,
                unreadable: None
            }
        ]
    );
    assert!(bucket.read_app(&AppSha([1; 32])).unwrap().is_none());

    // The shipped epoch comes back after a reopen, for the same instance only.
    assert_eq!(one.shipped_epoch().unwrap(), 2);
    one.close().unwrap();
    let again = ShipDb::open(Arc::clone(&bucket), "one", "inst-1", "host-1 /data").unwrap();
    assert_eq!(again.shipped_epoch().unwrap(), 2);
    again.close().unwrap();
    let other = ShipDb::open(Arc::clone(&bucket), "one", "inst-9", "host-9 /data").unwrap();
    assert_eq!(other.shipped_epoch().unwrap(), 0);
    other.close().unwrap();
    drop(two);
}

#[test]
fn a_writer_id_held_by_another_data_dir_is_refused() {
    let server = S3Server::start();
    let bucket = bucket(&server, "lease");
    let first = ShipDb::open(Arc::clone(&bucket), "dup", "inst-a", "host-a /srv/a").unwrap();
    first
        .apply(1, &[(AppSha([3; 32]), vec![(1, stats(1, 1, 1))])])
        .unwrap();
    first.publish().unwrap();
    let Err(err) = ShipDb::open(Arc::clone(&bucket), "dup", "inst-b", "host-b /srv/b") else {
        panic!("a second data dir took writer id dup");
    };
    assert!(matches!(err, S3Error::LeaseHeld { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("dup") && message.contains("host-a /srv/a"),
        "{message}"
    );
    // The first writer goes on, and its data is intact.
    first
        .apply(2, &[(AppSha([3; 32]), vec![(1, stats(1, 2, 2))])])
        .unwrap();
    first.publish().unwrap();
    let read = bucket.read_app(&AppSha([3; 32])).unwrap().unwrap();
    assert_eq!(read.addrs, vec![(1, stats(2, 1, 2))]);
}

#[test]
fn the_address_index_names_the_apps_of_an_address_or_block() {
    let server = S3Server::start();
    let bucket = bucket(&server, "addr-index");
    let (a, b) = (AppSha([0xaa; 32]), AppSha([0xbb; 32]));
    let one = ShipDb::open(Arc::clone(&bucket), "one", "inst-1", "host-1 /data").unwrap();
    one.apply(1, &[(a, vec![(10, stats(1, 1, 1)), (20, stats(1, 1, 1))])])
        .unwrap();
    // A second flush merges into the same /12's keys, and adds another /12; an app may come
    // twice, with its addresses out of order.
    let far = u32::from(std::net::Ipv4Addr::new(10, 1, 2, 3));
    one.apply(
        2,
        &[
            (a, vec![(far, stats(2, 2, 2)), (30, stats(1, 2, 2))]),
            (a, vec![(30, stats(1, 3, 3)), (10, stats(1, 2, 2))]),
        ],
    )
    .unwrap();
    one.publish().unwrap();
    let read = bucket.read_app(&a).unwrap().unwrap();
    assert_eq!(
        read.addrs,
        [
            (10, stats(2, 1, 2)),
            (20, stats(1, 1, 1)),
            (30, stats(2, 2, 3)),
            (far, stats(2, 2, 2))
        ]
    );
    let two = ShipDb::open(Arc::clone(&bucket), "two", "inst-2", "host-2 /data").unwrap();
    two.apply(1, &[(b, vec![(5, stats(1, 1, 1)), (20, stats(2, 1, 1))])])
        .unwrap();
    two.publish().unwrap();
    let named = |cidr: &str| {
        let mut apps = bucket
            .apps_with_address(cidr.parse().unwrap())
            .unwrap()
            .expect("every database has the index marker");
        apps.sort_unstable();
        apps.dedup();
        apps
    };
    assert_eq!(named("0.0.0.20"), [a, b]);
    assert_eq!(named("0.0.0.10"), [a]);
    assert_eq!(named("0.0.0.5"), [b]);
    assert_eq!(named("0.0.0.0/28"), [a, b]);
    assert_eq!(named("0.0.0.16/28"), [a, b]);
    assert_eq!(named("0.0.0.40"), Vec::<AppSha>::new());
    assert_eq!(named("0.0.0.30"), [a]);
    assert_eq!(named("10.1.2.3"), [a]);
    assert_eq!(named("10.1.2.4"), Vec::<AppSha>::new());
    assert_eq!(named("10.1.0.0/16"), [a]);
    // Another /16 of the same /12 (one index key): only addresses inside the block count.
    assert_eq!(named("10.2.0.0/16"), Vec::<AppSha>::new());
    assert_eq!(named("10.0.0.0/12"), [a]);
    assert_eq!(named("10.16.0.0/12"), Vec::<AppSha>::new());
    assert_eq!(named("10.0.0.0/8"), [a]);
    assert_eq!(named("0.0.0.0/0"), [a, b]);

    // A forgotten app that comes back is indexed again.
    assert_eq!(one.forget(1, &[a]).unwrap(), 4);
    one.publish().unwrap();
    assert_eq!(named("0.0.0.10"), Vec::<AppSha>::new());
    assert_eq!(named("0.0.0.20"), [b]);
    one.apply(3, &[(a, vec![(10, stats(1, 4, 4))])]).unwrap();
    one.publish().unwrap();
    assert_eq!(named("0.0.0.10"), [a]);
    assert_eq!(named("10.1.2.3"), Vec::<AppSha>::new());
    one.close().unwrap();
    two.close().unwrap();
}

#[test]
fn a_forget_keeps_the_other_apps_of_its_bucket_and_of_its_blocks() {
    let server = S3Server::start();
    let bucket = bucket(&server, "forget-bucket");
    // Three apps whose SHAs begin alike share their address and total keys; two of them also
    // share the index key of 0.0.0.0/12.
    let sha = |third: u8| {
        let mut sha = [0x5a; 32];
        sha[2] = third;
        AppSha(sha)
    };
    let (a, b, c) = (sha(1), sha(2), sha(3));
    let far = u32::from(std::net::Ipv4Addr::new(10, 1, 2, 3));
    let one = ShipDb::open(Arc::clone(&bucket), "one", "inst-1", "host-1 /data").unwrap();
    one.apply(
        1,
        &[
            (b, vec![(10, stats(1, 1, 1)), (20, stats(2, 1, 1))]),
            (a, vec![(10, stats(3, 1, 2)), (far, stats(1, 2, 2))]),
        ],
    )
    .unwrap();
    one.apply(2, &[(c, vec![(far, stats(5, 3, 3))])]).unwrap();
    one.publish().unwrap();
    let count = |app| AppCount {
        app,
        count: match app {
            x if x == a => 4,
            x if x == b => 3,
            _ => 5,
        },
        unreadable: None,
    };
    let mut listed = bucket.list_apps().unwrap();
    listed.sort_unstable_by_key(|c| c.app);
    assert_eq!(listed, [count(a), count(b), count(c)]);

    assert_eq!(one.forget(1, &[a]).unwrap(), 2);
    one.publish().unwrap();
    assert!(bucket.read_app(&a).unwrap().is_none());
    let read = bucket.read_app(&b).unwrap().unwrap();
    assert_eq!(read.addrs, [(10, stats(1, 1, 1)), (20, stats(2, 1, 1))]);
    let read = bucket.read_app(&c).unwrap().unwrap();
    assert_eq!(read.addrs, [(far, stats(5, 3, 3))]);
    let mut listed = bucket.list_apps().unwrap();
    listed.sort_unstable_by_key(|c| c.app);
    assert_eq!(listed, [count(b), count(c)]);
    let named = |cidr: &str| {
        let mut apps = bucket
            .apps_with_address(cidr.parse().unwrap())
            .unwrap()
            .unwrap();
        apps.sort_unstable();
        apps.dedup();
        apps
    };
    assert_eq!(named("0.0.0.10"), [b]);
    assert_eq!(named("10.1.2.3"), [c]);
    // The last apps of a bucket leave no key behind, and the bucket's apps come back whole.
    assert_eq!(one.forget(2, &[b, c]).unwrap(), 3);
    one.publish().unwrap();
    assert!(bucket.list_apps().unwrap().is_empty());
    assert_eq!(named("0.0.0.0/0"), Vec::<AppSha>::new());
    one.apply(3, &[(a, vec![(10, stats(1, 4, 4))])]).unwrap();
    one.publish().unwrap();
    assert_eq!(
        bucket.read_app(&a).unwrap().unwrap().addrs,
        [(10, stats(1, 4, 4))]
    );
    assert_eq!(named("0.0.0.10"), [a]);
    one.close().unwrap();
}

#[test]
fn a_database_in_another_key_layout_is_refused_with_a_clear_error() {
    let server = S3Server::start();
    let env = server.env();
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let url: StoreUrl = server.store_url("layout").parse().unwrap();
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(url.bucket.clone())
        .with_endpoint(var("AWS_ENDPOINT_URL"))
        .with_access_key_id(var("AWS_ACCESS_KEY_ID"))
        .with_secret_access_key(var("AWS_SECRET_ACCESS_KEY"))
        .with_region(var("AWS_REGION"))
        .with_allow_http(true)
        .build()
        .unwrap();
    // A database of the same writer id as an older build (layout 3) left it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = slatedb::Db::builder("layout/writers/old", Arc::new(store))
            .build()
            .await
            .unwrap();
        db.put(b"m/format", 3u64.to_le_bytes()).await.unwrap();
        db.put(b"c\x01\x23", 7u64.to_le_bytes()).await.unwrap();
        db.close().await.unwrap();
    });
    let bucket = bucket(&server, "layout");
    let Err(err) = ShipDb::open(Arc::clone(&bucket), "old", "inst-1", "host-1 /data") else {
        panic!("a database in layout 3 was opened for writing");
    };
    let message = err.to_string();
    assert!(matches!(err, S3Error::Corrupt { .. }), "{err:?}");
    assert!(
        message.contains("key layout 3") && message.contains("not layout 4"),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
    // A new writer id beside it starts its own database in this build's layout.
    let new = ShipDb::open(Arc::clone(&bucket), "new", "inst-2", "host-2 /data").unwrap();
    new.close().unwrap();
}

/// Calls the feed until it has named `expected.len()` apps (it looks at the bucket at most
/// every `LOOK_INTERVAL`), and returns what it named.
fn next_changes(feed: &mut dyn ChangeFeed, expected: usize) -> Vec<AppSha> {
    let start = Instant::now();
    let mut named = Vec::new();
    while named.len() < expected {
        assert!(
            start.elapsed() < WAIT_LIMIT,
            "the feed named {named:?}, not {expected} apps"
        );
        feed.changed(&mut named).unwrap();
        std::thread::park_timeout(LOOK_INTERVAL / 4);
    }
    named
}

#[test]
fn the_feed_names_each_shipped_flush_s_apps_in_order_across_writers_takeovers_and_resets() {
    let server = S3Server::start();
    let bucket = bucket(&server, "feed");
    let (a, b, c) = (AppSha([0xa0; 32]), AppSha([0xb0; 32]), AppSha([0xc0; 32]));
    let one = ShipDb::open(Arc::clone(&bucket), "one", "inst-1", "host-1 /data").unwrap();
    one.apply(1, &[(a, vec![(1, stats(1, 1, 1))])]).unwrap();
    one.publish().unwrap();

    // From now on: what was shipped before is not named.
    let mut feed = Store::follow_changes(&*bucket).unwrap();
    one.apply(2, &[(b, vec![(1, stats(1, 2, 2))])]).unwrap();
    one.apply(
        3,
        &[
            (c, vec![(1, stats(1, 3, 3))]),
            (a, vec![(2, stats(1, 3, 3))]),
        ],
    )
    .unwrap();
    one.publish().unwrap();
    // In flush order; within a flush by SHA.
    assert_eq!(next_changes(&mut *feed, 3), [b, a, c]);

    // A writer that appears later is read from its first flush.
    let two = ShipDb::open(Arc::clone(&bucket), "two", "inst-2", "host-2 /data").unwrap();
    assert_eq!(two.shipped_epoch().unwrap(), 0);
    two.apply(40, &[(c, vec![(9, stats(1, 4, 4))])]).unwrap();
    two.apply(41, &[(b, vec![(9, stats(1, 4, 4))])]).unwrap();
    two.publish().unwrap();
    assert_eq!(next_changes(&mut *feed, 2), [c, b]);

    // Another data dir takes writer id one over (its epochs start anew): every app of that
    // database is named once, then its flushes.
    one.close().unwrap();
    let taken = ShipDb::open(Arc::clone(&bucket), "one", "inst-9", "host-9 /data").unwrap();
    assert_eq!(taken.shipped_epoch().unwrap(), 0);
    let d = AppSha([0xd0; 32]);
    // (Epochs past the old instance's: where they overlap, the old instance's apps of the
    // same epoch are named too, which costs a read and prints nothing.)
    taken.apply(10, &[(d, vec![(1, stats(1, 5, 5))])]).unwrap();
    taken.publish().unwrap();
    let mut named = next_changes(&mut *feed, 4);
    named.sort();
    assert_eq!(named, [a, b, c, d]);
    taken.apply(11, &[(a, vec![(1, stats(1, 6, 6))])]).unwrap();
    taken.publish().unwrap();
    assert_eq!(next_changes(&mut *feed, 1), [a]);

    // A reset: the new generation's databases are followed from their start.
    let generation = bucket.advance_generation(0).unwrap();
    taken.close_keeping_lease().unwrap();
    let next = ShipDb::open_in(
        Arc::clone(&bucket),
        generation,
        "one",
        "inst-9",
        "host-9 /data",
    )
    .unwrap();
    next.apply(12, &[(d, vec![(7, stats(1, 7, 7))])]).unwrap();
    next.publish().unwrap();
    assert_eq!(next_changes(&mut *feed, 1), [d]);
    next.close().unwrap();
    two.close().unwrap();
}
