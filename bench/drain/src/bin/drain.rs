//! `ipevent-drain`: the benchmark's baselines, receivers that count datagrams and do nothing
//! else (no decoding, no hand-off, no store). Their CPU time per datagram is what the
//! receiver's cost is compared to, on the same traffic in the same benchmark run.
//!
//! - `--mode poll` (the default) sets its socket up the way `ipevent-receiver` did before it
//!   read drops from the socket (large receive buffer, `SO_RXQ_OVFL` on every datagram), waits
//!   on it with one mio `Poll`, and on readiness calls `recvmmsg` of 64 until the socket would
//!   block.
//! - `--mode floor` is the kernel's floor: one blocking socket, `recvmmsg` of 256 that waits
//!   for the first datagram and takes what else is queued, in a loop; no poll, no ancillary
//!   data. The drop count is read from the socket (`SO_MEMINFO`) when the stats are written.
//!
//! Counters go to `--stats-file` (JSON, replaced atomically) every `--stats-interval-ms` and
//! at exit; SIGTERM or SIGINT stops it after one last drain, and the final counters are also
//! printed on stdout.

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::builder::TypedValueParser;
use clap::{Parser, ValueEnum};
use ipevent_core::sys::{self, RecvBatch, UdpSetup};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

/// Datagrams per `recvmmsg` call in poll mode: what the receiver took per call before it read
/// drops from the socket.
const POLL_RECV_BATCH: usize = 64;

/// Datagrams per `recvmmsg` call of the floor.
const FLOOR_RECV_BATCH: usize = 256;

/// Largest datagram received whole: the protocol's limit, as in the receiver.
const MAX_DATAGRAM_BYTES: usize = ipevent_core::wire::MAX_DATAGRAM_BYTES;

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

    /// How to receive: `poll` (epoll, non-blocking recvmmsg, SO_RXQ_OVFL) or `floor`
    /// (blocking recvmmsg, nothing else).
    #[arg(long, value_enum, default_value_t = Mode::Poll)]
    mode: Mode,

    /// Datagrams per recvmmsg call (1-1024; default 64 in poll mode, 256 for the floor).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_RECV_BATCH as i64).map(usize::from))]
    batch: Option<usize>,

    /// Where to write the counters (JSON). Its appearance means the socket is bound.
    #[arg(long)]
    stats_file: PathBuf,

    /// How often the stats file is rewritten, in milliseconds.
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    stats_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Poll,
    Floor,
}

/// What the drain has seen.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    datagrams: u64,
    bytes: u64,
    /// Cumulative kernel drop count last reported by `SO_RXQ_OVFL` (poll mode) or read from
    /// the socket (floor).
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

/// The drain's socket, counters and stats file.
struct Drain<'a> {
    args: &'a Args,
    socket: std::net::UdpSocket,
    local: SocketAddr,
    granted_bytes: usize,
    batch: usize,
    recv: RecvBatch,
    counts: Counts,
    started: Instant,
}

impl Drain<'_> {
    fn open(args: &Args) -> Result<Drain<'_>> {
        let floor = args.mode == Mode::Floor;
        let setup = UdpSetup {
            rcvbuf_bytes: args.rcvbuf_bytes,
            reuse_port: false,
            nonblocking: !floor,
            drop_counter_per_datagram: !floor,
        };
        let (socket, granted_bytes) = sys::bind_udp(args.listen, &setup)
            .with_context(|| format!("binding UDP {}", args.listen))?;
        let batch = args.batch.unwrap_or(if floor {
            FLOOR_RECV_BATCH
        } else {
            POLL_RECV_BATCH
        });
        let recv = if floor {
            RecvBatch::new(batch, MAX_DATAGRAM_BYTES)
        } else {
            RecvBatch::with_drop_counter(batch, MAX_DATAGRAM_BYTES)
        };
        Ok(Drain {
            args,
            local: socket.local_addr()?,
            socket,
            granted_bytes,
            batch,
            recv,
            counts: Counts::default(),
            started: Instant::now(),
        })
    }

    fn report(&self) -> serde_json::Value {
        json!({
            "pid": std::process::id(),
            "listen": self.local.to_string(),
            "mode": format!("{:?}", self.args.mode).to_lowercase(),
            "rcvbuf_bytes": self.granted_bytes,
            "batch": self.batch,
            "datagrams": self.counts.datagrams,
            "bytes": self.counts.bytes,
            "kernel_drops": self.counts.kernel_drops,
            "recv_calls": self.counts.recv_calls,
            "wakeups": self.counts.wakeups,
            "uptime_secs": self.started.elapsed().as_secs_f64(),
        })
    }

    fn write_stats(&self) -> Result<()> {
        write_atomic(&self.args.stats_file, &self.report())
    }

    fn count(&mut self, n: usize) {
        self.counts.recv_calls += 1;
        self.counts.datagrams += n as u64;
        for i in 0..n {
            let datagram = self.recv.get(i);
            self.counts.bytes += datagram.bytes.len() as u64;
            if let Some(drops) = datagram.drops {
                self.counts.kernel_drops = u64::from(drops);
            }
        }
    }

    /// Calls `recvmmsg` without waiting until the socket would block (or `max_calls` calls).
    fn drain(&mut self, max_calls: usize) -> Result<()> {
        for _ in 0..max_calls {
            match self.recv.recv(&self.socket) {
                Ok(n) => self.count(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("recvmmsg"),
            }
        }
        Ok(())
    }

    /// Poll mode: one mio poll over the socket and the signals.
    fn run_poll(mut self) -> Result<()> {
        let mut poll = Poll::new().context("creating the poll")?;
        let mut socket = UdpSocket::from_std(self.socket.try_clone()?);
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE)?;
        let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let interval = Duration::from_millis(self.args.stats_interval_ms);
        self.write_stats()?;
        let mut next_stats = Instant::now() + interval;
        let mut events = Events::with_capacity(16);
        // Datagrams may have arrived between bind and registration: look once.
        let mut readable = true;
        let mut stop = false;
        while !stop {
            if readable {
                self.drain(usize::MAX)?;
                readable = false;
            }
            let now = Instant::now();
            if now >= next_stats {
                self.write_stats()?;
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
                        self.counts.wakeups += 1;
                        readable = true;
                    }
                    SIGNALS => stop |= signals.pending().next().is_some(),
                    _ => {}
                }
            }
        }
        self.finish()
    }

    /// The floor: a blocking `recvmmsg` in a loop. The socket's receive timeout (the stats
    /// interval) bounds each wait, so the stats are written and a signal is seen while idle.
    fn run_floor(mut self) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register(signal, stop.clone())
                .context("installing signal handlers")?;
        }
        let interval = Duration::from_millis(self.args.stats_interval_ms);
        self.socket.set_read_timeout(Some(interval))?;
        self.write_stats()?;
        let mut next_stats = Instant::now() + interval;
        while !stop.load(Relaxed) {
            match self.recv.recv_wait(&self.socket) {
                Ok(n) => {
                    self.counts.wakeups += 1;
                    self.count(n);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("recvmmsg"),
            }
            let now = Instant::now();
            if now >= next_stats {
                self.counts.kernel_drops = u64::from(sys::socket_drops(&self.socket)?);
                self.write_stats()?;
                next_stats = now + interval;
            }
        }
        self.socket.set_nonblocking(true)?;
        self.finish()
    }

    /// One last drain, then the final counters to the stats file and stdout.
    fn finish(mut self) -> Result<()> {
        self.drain(FINAL_DRAIN_CALLS)?;
        if self.args.mode == Mode::Floor {
            self.counts.kernel_drops = u64::from(sys::socket_drops(&self.socket)?);
        }
        let last = self.report();
        write_atomic(&self.args.stats_file, &last)?;
        println!("{last}");
        Ok(())
    }
}

fn run(args: &Args) -> Result<()> {
    let drain = Drain::open(args)?;
    match args.mode {
        Mode::Poll => drain.run_poll(),
        Mode::Floor => drain.run_floor(),
    }
}

/// Replaces `path` with `value` so a reader never sees half a file.
fn write_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, value.to_string())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
