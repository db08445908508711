//! `ipevent-blast`: sends valid events with a shape `ipevent-test-client` does not offer, for
//! the benchmark cases that need one (one app with thousands of distinct addresses).
//!
//! Event `i` goes to app `i % apps` and to that app's address `(i / apps) % addrs`, so with
//! `count` a multiple of `apps * addrs` every app sees every one of its addresses equally
//! often. An app's first 14 addresses are the hosts of its own /28 (they classify as good);
//! the others are distinct addresses outside that /28 (bad), placed with the test client's
//! `scenario` geometry (`in_block`, `HOSTS_PER_BLOCK`). SHAs and
//! addresses derive from `--seed`, so a run is repeatable. Datagrams are encoded with
//! `ipevent_core::wire::encode` and sent with `sendmmsg` as fast as the kernel takes them.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipevent_core::sys::SendBatch;
use ipevent_core::wire::{self, AppSha, IpEvent, ENCODED_MAX_BYTES};
use ipevent_test_client::scenario::{in_block, splitmix64 as mix, HOSTS_PER_BLOCK};
use serde_json::json;

/// Datagrams per `sendmmsg` call.
const SEND_BATCH: usize = 256;

/// Apps listed one by one in the JSON summary at most.
const LISTED_APPS_MAX: u64 = 16;

/// How long one refused batch is retried (full send buffer, `ENOBUFS`) before giving up.
const SEND_STALL_LIMIT: Duration = Duration::from_secs(5);

/// Sends valid IpEvent datagrams: `apps` apps x `addrs` distinct addresses, `count` in all.
#[derive(Parser, Debug)]
#[command(name = "ipevent-blast", version, about, long_about = None)]
struct Args {
    /// Receiver HOST:PORT.
    #[arg(long)]
    to: SocketAddr,

    /// Number of apps.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    apps: u64,

    /// Distinct addresses per app.
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    addrs: u64,

    /// Datagrams to send in all.
    #[arg(long, default_value_t = 100_000)]
    count: u64,

    /// Seed of the SHAs and addresses.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// App `index`'s SHA: four mixed words of the seed and the index.
fn app_sha(seed: u64, index: u64) -> AppSha {
    let mut bytes = [0u8; 32];
    for (k, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        let word = mix(seed ^ mix(index.wrapping_mul(4).wrapping_add(k as u64)));
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    AppSha(bytes)
}

/// App `index`'s `addrs` distinct addresses: the 14 hosts of its /28 first, then distinct
/// addresses outside that /28.
fn app_addrs(seed: u64, index: u64, addrs: u64) -> Vec<u32> {
    let block = (mix(seed ^ index ^ 0x5151) as u32) & !0xf;
    let mut seen = HashSet::with_capacity(addrs as usize);
    let mut out = Vec::with_capacity(addrs as usize);
    let mut k = 0u64;
    while (out.len() as u64) < addrs {
        let ip = if k < HOSTS_PER_BLOCK as u64 {
            block | (k as u32 + 1)
        } else {
            let ip = mix(seed ^ mix(index ^ (k << 24))) as u32;
            if in_block(ip, block) {
                k += 1;
                continue;
            }
            ip
        };
        k += 1;
        if seen.insert(ip) {
            out.push(ip);
        }
    }
    out
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipevent-blast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let shas: Vec<AppSha> = (0..args.apps).map(|a| app_sha(args.seed, a)).collect();
    let tables = address_tables(args);
    let bind = if args.to.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let socket = UdpSocket::bind(bind).with_context(|| format!("binding UDP {bind}"))?;
    let mut batch = Batch::new();
    let mut per_app = vec![0u64; shas.len().min(LISTED_APPS_MAX as usize)];

    let started = Instant::now();
    let mut sent = 0u64;
    while sent < args.count {
        let n = (args.count - sent).min(SEND_BATCH as u64) as usize;
        batch.encode(args, &shas, &tables, sent, n, &mut per_app);
        batch.send_all(&socket, args.to)?;
        sent += n as u64;
    }
    println!(
        "{}",
        summary(args, &shas, &per_app, sent, started.elapsed().as_secs_f64())
    );
    Ok(())
}

/// One address table per app when there are few apps; with many, they share app 0's table
/// (a table per app would cost `apps * addrs` words).
fn address_tables(args: &Args) -> Vec<Vec<u32>> {
    if args.apps <= LISTED_APPS_MAX {
        (0..args.apps)
            .map(|a| app_addrs(args.seed, a, args.addrs))
            .collect()
    } else {
        vec![app_addrs(args.seed, 0, args.addrs)]
    }
}

/// One `sendmmsg` batch of encoded datagrams.
struct Batch {
    send: SendBatch,
    slots: Vec<[u8; ENCODED_MAX_BYTES]>,
    lens: Vec<usize>,
    n: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            send: SendBatch::new(SEND_BATCH),
            slots: vec![[0u8; ENCODED_MAX_BYTES]; SEND_BATCH],
            lens: vec![0usize; SEND_BATCH],
            n: 0,
        }
    }

    /// Encodes events `first..first + n` and counts them per listed app.
    fn encode(
        &mut self,
        args: &Args,
        shas: &[AppSha],
        tables: &[Vec<u32>],
        first: u64,
        n: usize,
        per_app: &mut [u64],
    ) {
        for j in 0..n {
            let i = first + j as u64;
            let app = i % args.apps;
            let addr = (i / args.apps) % args.addrs;
            let table = &tables[(app as usize).min(tables.len() - 1)];
            let event = IpEvent {
                app: shas[app as usize],
                ip: table[addr as usize],
            };
            self.lens[j] = wire::encode(&event, &mut self.slots[j]);
            if let Some(count) = per_app.get_mut(app as usize) {
                *count += 1;
            }
        }
        self.n = n;
    }

    /// Sends the whole batch, retrying what the kernel refuses for lack of buffer for up to
    /// [`SEND_STALL_LIMIT`].
    fn send_all(&mut self, socket: &UdpSocket, to: SocketAddr) -> Result<()> {
        let mut done = 0;
        let mut stalled: Option<Instant> = None;
        while done < self.n {
            let refs: Vec<&[u8]> = (done..self.n)
                .map(|j| &self.slots[j][..self.lens[j]])
                .collect();
            match self.send.send(socket, &refs, to) {
                Ok(k) => {
                    done += k;
                    stalled = None;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) || e.raw_os_error() == Some(libc::ENOBUFS) =>
                {
                    let since = *stalled.get_or_insert_with(Instant::now);
                    if since.elapsed() > SEND_STALL_LIMIT {
                        bail!("sending to {to}: stalled for {SEND_STALL_LIMIT:?}: {e}");
                    }
                    std::thread::yield_now();
                }
                Err(e) => return Err(e).with_context(|| format!("sending to {to}")),
            }
        }
        Ok(())
    }
}

/// The JSON summary printed at the end.
fn summary(
    args: &Args,
    shas: &[AppSha],
    per_app: &[u64],
    sent: u64,
    elapsed: f64,
) -> serde_json::Value {
    let apps: Vec<_> = per_app
        .iter()
        .enumerate()
        .map(|(a, events)| {
            json!({
                "sha": shas[a].to_hex(),
                "events": events,
                "addresses": args.addrs.min(*events),
            })
        })
        .collect();
    json!({
        "sent": sent,
        "elapsed_secs": elapsed,
        "rate_per_sec": sent as f64 / elapsed.max(1e-9),
        "apps_total": args.apps,
        "addrs_per_app": args.addrs,
        "apps": apps,
    })
}
