//! One app with very many distinct addresses, through the real receiver: it may not starve
//! other apps, its log's compaction stays amortised, SIGTERM still ends a long flush, and the
//! per-app address cap refuses exactly what it must. Scaled down here; the full size (about
//! 16M addresses) is `bench/store.py giant`.

use std::net::{SocketAddr, UdpSocket};

use ipevent_core::sys::SendBatch;
use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use ipevent_testkit::{sender, stdout_json, Receiver};

const BIG: AppSha = AppSha([0xb1; 32]);
const SMALL: AppSha = AppSha([0x5a; 32]);

fn event(app: AppSha, ip: u32) -> Vec<u8> {
    wire::encode_to_vec(&IpEvent { app, ip })
}

/// Sends one event per address with `sendmmsg`, in batches of 256.
fn blast(to: SocketAddr, app: AppSha, ips: impl Iterator<Item = u32>) -> u64 {
    let socket = sender();
    let mut batch = SendBatch::new(256);
    let mut datagrams: Vec<Vec<u8>> = Vec::with_capacity(256);
    let mut sent = 0u64;
    let mut flush = |datagrams: &mut Vec<Vec<u8>>| {
        let mut done = 0;
        while done < datagrams.len() {
            let refs: Vec<&[u8]> = datagrams[done..].iter().map(Vec::as_slice).collect();
            match batch.send(&socket, &refs, to) {
                Ok(n) => done += n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => std::thread::yield_now(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("sending: {e}"),
            }
        }
        datagrams.clear();
    };
    for ip in ips {
        datagrams.push(event(app, ip));
        sent += 1;
        if datagrams.len() == 256 {
            flush(&mut datagrams);
        }
    }
    flush(&mut datagrams);
    sent
}

fn count_of(rx: &Receiver, app: AppSha) -> u64 {
    let out = rx.query(&["--sync", &app.to_hex()]);
    assert!(
        out.status.success(),
        "ipevent-query --sync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_json(&out)["count"].as_u64().unwrap()
}

/// Waits until the receiver has read (or the kernel has dropped) everything sent so far.
fn wait_taken(rx: &mut Receiver, sent: u64) -> u64 {
    rx.wait_stats("every datagram to be read or counted as dropped", |s| {
        s.datagrams_received + s.kernel_drops >= sent
    })
    .kernel_drops
}

#[test]
fn a_big_app_does_not_starve_another_apps_sync() {
    // Short flushes: the big app's log gets a block almost every few milliseconds, so the
    // writer compacts it many times while the small app asks for read-after-write.
    let mut rx = Receiver::start(&["--flush-interval-ms", "2", "--stats-interval-ms", "10"]);
    let tx = sender();
    let (mut sent, mut small_sent) = (0u64, 0u64);
    for round in 0..20u32 {
        let start = round * 10_000;
        sent += blast(rx.addr, BIG, start..start + 10_000);
        // Once the burst is read, the small app's event goes into an empty socket buffer.
        wait_taken(&mut rx, sent);
        tx.send_to(&event(SMALL, 0x0a00_0001), rx.addr).unwrap();
        sent += 1;
        small_sent += 1;
        wait_taken(&mut rx, sent);
        assert_eq!(count_of(&rx, SMALL), small_sent, "round {round}");
    }
    let stats = rx.wait_stats("the counters after the last sync", |s| {
        s.datagrams_received + s.kernel_drops >= sent && s.events_pending == 0
    });
    assert!(stats.store_appended_bytes > 0);
    // Amortised compaction: everything rewritten is at most twice what was appended (plus
    // the block headers of the runs that paid for it).
    assert!(
        stats.store_rewritten_bytes <= 2 * stats.store_appended_bytes + 4096,
        "rewrote {} bytes for {} appended in {} flushes",
        stats.store_rewritten_bytes,
        stats.store_appended_bytes,
        stats.flushes
    );
    let accepted_big = stats.events_accepted - small_sent;
    assert_eq!(count_of(&rx, BIG), accepted_big);
    rx.stop();
}

#[test]
fn sigterm_during_a_long_flush_exits_zero_with_everything_written() {
    // Everything stays pending until SIGTERM, which then writes one large app and compacts
    // nothing on the way out.
    let mut rx = Receiver::start(&["--flush-interval-ms", "3600000"]);
    let mut sent = 0;
    for round in 0..4u32 {
        let start = round * 100_000;
        sent += blast(rx.addr, BIG, start..start + 100_000);
        wait_taken(&mut rx, sent);
    }
    let accepted = rx.stats().unwrap().events_accepted;
    // stop_with waits a generous, bounded time (testkit's WAIT_LIMIT) and fails beyond it.
    let status = rx.stop_with(libc::SIGTERM);
    assert!(status.success(), "exit {status}");
    let out = rx.query(&[&BIG.to_hex()]);
    assert_eq!(stdout_json(&out)["count"].as_u64().unwrap(), accepted);
}

/// Sends `ips` for `app` one small burst at a time, each into an empty socket buffer.
fn send_all(rx: &mut Receiver, tx: &UdpSocket, sent: &mut u64, app: AppSha, ips: &[u32]) {
    for chunk in ips.chunks(20) {
        for ip in chunk {
            tx.send_to(&event(app, *ip), rx.addr).unwrap();
            *sent += 1;
        }
        assert_eq!(wait_taken(rx, *sent), 0, "the kernel dropped datagrams");
    }
}

#[test]
fn the_address_cap_refuses_exactly_the_new_addresses_beyond_it() {
    let flags = [
        "--max-addresses-per-app",
        "100",
        "--flush-interval-ms",
        "3600000",
    ];
    let mut rx = Receiver::start(&flags);
    let tx = sender();
    let mut sent = 0;
    // 80 new addresses: all stored.
    let first: Vec<u32> = (1000..1080).collect();
    send_all(&mut rx, &tx, &mut sent, BIG, &first);
    assert_eq!(count_of(&rx, BIG), 80);
    // 70 new ones, three times each, and 20 known ones: 20 of the new fit (the lowest
    // addresses), the other 50 are refused with all their events; known addresses always go in.
    let new: Vec<u32> = (5000..5070).collect();
    for _ in 0..3 {
        send_all(&mut rx, &tx, &mut sent, BIG, &new);
    }
    send_all(&mut rx, &tx, &mut sent, BIG, &first[..20]);
    assert_eq!(count_of(&rx, BIG), 80 + 20 * 3 + 20);
    let stats = rx.stats().unwrap();
    assert_eq!(stats.events_refused, 150);
    assert_eq!(stats.refused.get("address_limit"), Some(&150));
    // Another app has its own allowance.
    send_all(&mut rx, &tx, &mut sent, SMALL, &[1, 2, 3]);
    assert_eq!(count_of(&rx, SMALL), 3);
    rx.stop();

    // After a restart the writer learns the log again: still exact.
    let mut tmp = rx.take_tmp();
    let dir = tmp.as_ref().unwrap().path().to_path_buf();
    let mut rx = Receiver::start_in(&dir, &flags);
    let mut sent = 0;
    send_all(&mut rx, &tx, &mut sent, BIG, &[1000, 5000, 5069, 9, 10]);
    assert_eq!(count_of(&rx, BIG), 160 + 2);
    let stats = rx.stats().unwrap();
    assert_eq!(stats.refused.get("address_limit"), Some(&3));
    assert_eq!(stats.events_refused, 3);
    rx.stop();
    drop(tmp.take());
}
