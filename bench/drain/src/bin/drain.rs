//! `ipevent-drain`: the benchmark's baseline receiver.
//!
//! It binds one UDP socket the way `ipevent-receiver` does (large receive buffer, forced past
//! `net.core.rmem_max` when allowed, `SO_RXQ_OVFL`), waits on it with one mio `Poll`, and on
//! readiness calls `recvmmsg` with the receiver's batch size until the socket would block. It
//! counts datagrams and bytes and does nothing else: no decoding, no hand-off, no store. Its
//! CPU time per datagram is the floor the receiver's cost is compared to, on the same traffic
//! in the same benchmark run.
//!
//! Counters go to `--stats-file` (JSON, replaced atomically) every `--stats-interval-ms` and
//! at exit; SIGTERM or SIGINT stops it after one last drain, and the final counters are also
//! printed on stdout.

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::builder::TypedValueParser;
use clap::Parser;
use ipevent_core::sys::{self, RecvBatch};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use socket2::{Domain, Protocol, Socket, Type};

/// Datagrams per `recvmmsg` call by default: the receiver's `RECV_BATCH`, so both make the
/// same number of system calls for the same traffic.
const DEFAULT_RECV_BATCH: usize = 64;

/// Largest batch `RecvBatch` accepts.
const MAX_RECV_BATCH: usize = 1024;

/// `recvmmsg` calls the final drain makes at most, so a sender that never stops cannot keep
/// the drain from exiting.
const FINAL_DRAIN_CALLS: usize = 1 << 16;

const SOCKET: Token = Token(0);
const SIGNALS: Token = Token(1);

/// Bare recvmmsg drain: receives and counts UDP datagrams, nothing more (benchmark baseline).
#[derive(Parser, Debug)]
#[command(name = "ipevent-drain", version, about, long_about = None)]
struct Args {
    /// UDP address to listen on (port 0: the kernel picks one; see the stats file).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Receive buffer to ask for, in bytes (the receiver's default).
    #[arg(long, default_value_t = 32 << 20)]
    rcvbuf_bytes: usize,

    /// Datagrams per recvmmsg call (1-1024).
    #[arg(long, default_value_t = DEFAULT_RECV_BATCH,
          value_parser = clap::value_parser!(u16).range(1..=MAX_RECV_BATCH as i64).map(usize::from))]
    batch: usize,

    /// Where to write the counters (JSON). Its appearance means the socket is bound.
    #[arg(long)]
    stats_file: PathBuf,

    /// How often the stats file is rewritten, in milliseconds.
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    stats_interval_ms: u64,
}

/// What the drain has seen.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    datagrams: u64,
    bytes: u64,
    /// Cumulative kernel drop count last reported by `SO_RXQ_OVFL`.
    kernel_drops: u64,
    recv_calls: u64,
    wakeups: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipevent-drain: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let (socket, granted_bytes) = bind(args.listen, args.rcvbuf_bytes)
        .with_context(|| format!("binding UDP {}", args.listen))?;
    let local = socket.local_addr()?;
    let mut socket = UdpSocket::from_std(socket);
    let mut poll = Poll::new().context("creating the poll")?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE)?;
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;

    let mut recv = RecvBatch::new(args.batch);
    let mut counts = Counts::default();
    let started = Instant::now();
    let report = |counts: &Counts| {
        json!({
            "pid": std::process::id(),
            "listen": local.to_string(),
            "rcvbuf_bytes": granted_bytes,
            "batch": args.batch,
            "datagrams": counts.datagrams,
            "bytes": counts.bytes,
            "kernel_drops": counts.kernel_drops,
            "recv_calls": counts.recv_calls,
            "wakeups": counts.wakeups,
            "uptime_secs": started.elapsed().as_secs_f64(),
        })
    };
    let interval = Duration::from_millis(args.stats_interval_ms);
    write_atomic(&args.stats_file, &report(&counts))?;
    let mut next_stats = Instant::now() + interval;

    let mut events = Events::with_capacity(16);
    // Datagrams may have arrived between bind and registration: look once.
    let mut readable = true;
    let mut stop = false;
    while !stop {
        if readable {
            drain(&mut recv, &socket, &mut counts, usize::MAX)?;
            readable = false;
        }
        let now = Instant::now();
        if now >= next_stats {
            write_atomic(&args.stats_file, &report(&counts))?;
            next_stats = now + interval;
        }
        match poll.poll(&mut events, Some(next_stats.saturating_duration_since(now))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("polling"),
        }
        for event in events.iter() {
            match event.token() {
                SOCKET => {
                    counts.wakeups += 1;
                    readable = true;
                }
                SIGNALS => stop |= signals.pending().next().is_some(),
                _ => {}
            }
        }
    }
    drain(&mut recv, &socket, &mut counts, FINAL_DRAIN_CALLS)?;
    let last = report(&counts);
    write_atomic(&args.stats_file, &last)?;
    println!("{last}");
    Ok(())
}

/// Calls `recvmmsg` until the socket would block (or `max_calls` calls), counting.
fn drain(
    recv: &mut RecvBatch,
    socket: &UdpSocket,
    counts: &mut Counts,
    max_calls: usize,
) -> Result<()> {
    for _ in 0..max_calls {
        match recv.recv(socket) {
            Ok(n) => {
                counts.recv_calls += 1;
                counts.datagrams += n as u64;
                for i in 0..n {
                    let datagram = recv.get(i);
                    counts.bytes += datagram.bytes.len() as u64;
                    if let Some(drops) = datagram.drops {
                        counts.kernel_drops = u64::from(drops);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("recvmmsg"),
        }
    }
    Ok(())
}

/// Binds a non-blocking UDP socket with the receiver's options; returns it and the receive
/// buffer the kernel granted (as the kernel reports it: twice the usable size).
fn bind(addr: SocketAddr, rcvbuf_bytes: usize) -> Result<(std::net::UdpSocket, usize)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    let _ = socket.set_recv_buffer_size(rcvbuf_bytes);
    if socket.recv_buffer_size()? / 2 < rcvbuf_bytes {
        // Needs CAP_NET_ADMIN; without it the drain keeps what rmem_max allows, as the
        // receiver does.
        let _ = sys::force_recv_buffer(&socket, rcvbuf_bytes);
    }
    sys::enable_drop_counter(&socket).context("enabling SO_RXQ_OVFL")?;
    socket.bind(&addr.into())?;
    let granted = socket.recv_buffer_size()?;
    Ok((socket.into(), granted))
}

/// Replaces `path` with `value` so a reader never sees half a file.
fn write_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, value.to_string())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
