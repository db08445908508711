//! The ingest loop: one mio `Poll` per thread; on readiness, `recvmmsg` in batches until the
//! socket would block, validate in place, and hand full batches to the writer.
//!
//! Thread 0 (the lead) also owns the control socket ([`crate::control`]) and the signals: on a
//! control request it asks every other ingest thread to drain (they answer through the
//! writer's queue with a marker), drains its own sockets, and queues the request behind
//! everything drained, so the writer serves it only after every datagram that was in a socket
//! is aggregated.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use crossbeam_channel::{Receiver, Sender};
use ipevent_core::sys::{self, RecvBatch};
use ipevent_core::{wire, Reject};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::control::{self, Control, Op, Request};
use crate::counters::{Counters, LocalCounts};
use crate::run_state::unix_now;
use crate::writer::{BatchPool, Record, ToWriter, BATCH_RECORDS};

/// Datagrams per `recvmmsg` call.
pub const RECV_BATCH: usize = 64;

/// `recvmmsg` calls per socket before the loop looks at its other sources, so a flood on one
/// socket cannot starve signals and control requests.
const FAIR_CALLS: usize = 64;

/// `recvmmsg` calls a drain for a control request or shutdown makes per socket at most; bounds
/// the drain when senders outpace us.
const DRAIN_CALLS: usize = 1 << 14;

/// Longest a partly filled batch waits for more records before it goes to the writer. Under
/// load batches fill long before this, so the pool holds as many events as it can; when
/// traffic is light, events still reach the writer within this delay. Control requests and
/// shutdown hand over at once.
const HANDOFF_DELAY: Duration = Duration::from_millis(5);

/// After a pass that emptied every socket, the thread rests this long before it waits for
/// readiness again, so that the next pass takes what arrived meanwhile in a few `recvmmsg`
/// calls instead of being woken for every datagram or two (the way a network card coalesces
/// interrupts). It bounds how late a datagram is read and a control request is seen.
const REST: Duration = Duration::from_micros(500);

/// Smallest receive buffer (as the kernel reports it: twice the usable bytes) of every socket
/// for the thread to rest: 8 MiB usable holds a rest's worth of datagrams arriving at over 10M
/// per second (a loopback datagram books about 1 KiB). A smaller buffer reads at once.
const REST_MIN_RCVBUF: usize = 16 << 20;

/// How often a socket that received datagrams has its kernel drop count read
/// (`sys::socket_drops`, one `getsockopt`); a drain for a control request or shutdown always
/// reads it, so the count a sync or the last stats report is exact.
const DROPS_INTERVAL: Duration = Duration::from_millis(100);

const WAKER: Token = Token(1 << 20);
const SIGNALS: Token = Token((1 << 20) + 1);

/// Messages to a non-lead ingest thread.
pub enum IngestCtl {
    /// Drain every socket, hand off, then send the writer a marker for this request.
    Drain(u64),
    /// Drain, hand off and exit.
    Stop,
}

/// How the lead reaches another ingest thread.
pub struct Peer {
    pub ctl: Sender<IngestCtl>,
    pub waker: Arc<Waker>,
}

/// What only the lead thread has.
pub struct Lead {
    pub control: Control,
    pub peers: Vec<Peer>,
    signals: Signals,
}

impl Lead {
    pub fn new(control: Control, peers: Vec<Peer>) -> Result<Lead> {
        Ok(Lead {
            control,
            peers,
            signals: Signals::new([SIGTERM, SIGINT])?,
        })
    }

    /// Asks every other ingest thread to drain for request `id`; returns how many will send
    /// a marker for it.
    fn drain_peers(&self, id: u64) -> usize {
        self.peers
            .iter()
            .filter(|peer| peer.ctl.send(IngestCtl::Drain(id)).is_ok() && peer.waker.wake().is_ok())
            .count()
    }
}

/// One ingest thread.
pub struct Ingest {
    poll: Poll,
    sockets: Vec<UdpSocket>,
    /// Sockets that may still hold datagrams (readiness is edge-triggered).
    readable: Vec<bool>,
    /// The socket's kernel drop count when last read, per socket.
    last_drops: Vec<u32>,
    /// Sockets that received datagrams since their drop count was last read.
    drops_unread: Vec<bool>,
    /// When the drop counts are read next, if any is unread.
    drops_due: Option<Instant>,
    /// Every socket's buffer is large enough to rest between passes (see [`REST`]).
    may_rest: bool,
    recv: RecvBatch,
    batch: Vec<Record>,
    /// When the first record of `batch` arrived.
    batch_since: Option<Instant>,
    to_writer: Sender<ToWriter>,
    free: BatchPool,
    counters: Arc<Counters>,
    local: LocalCounts,
    ctl: Receiver<IngestCtl>,
    /// Our own waker: it must outlive every wake sent to us, or the event can be lost when
    /// the waker's last owner drops it.
    _waker: Arc<Waker>,
    lead: Option<Lead>,
}

impl Ingest {
    /// Sets up a thread's loop over `sockets`. Returns it and the waker others use to reach it.
    pub fn new(
        sockets: Vec<std::net::UdpSocket>,
        to_writer: Sender<ToWriter>,
        free: BatchPool,
        counters: Arc<Counters>,
        ctl: Receiver<IngestCtl>,
    ) -> Result<(Ingest, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let may_rest = sockets.iter().all(|s| {
            socket2::SockRef::from(s)
                .recv_buffer_size()
                .is_ok_and(|bytes| bytes >= REST_MIN_RCVBUF)
        });
        let mut mio_sockets = Vec::with_capacity(sockets.len());
        for (i, socket) in sockets.into_iter().enumerate() {
            let mut socket = UdpSocket::from_std(socket);
            poll.registry()
                .register(&mut socket, Token(i), Interest::READABLE)?;
            mio_sockets.push(socket);
        }
        let batch = free
            .take()
            .ok_or_else(|| anyhow!("the writer has stopped"))?;
        let n = mio_sockets.len();
        Ok((
            Ingest {
                poll,
                sockets: mio_sockets,
                // Datagrams may have arrived before registration: look once.
                readable: vec![true; n],
                last_drops: vec![0; n],
                drops_unread: vec![false; n],
                drops_due: None,
                may_rest,
                recv: RecvBatch::new(RECV_BATCH, wire::MAX_DATAGRAM_BYTES),
                batch,
                batch_since: None,
                to_writer,
                free,
                counters,
                local: LocalCounts::default(),
                ctl,
                _waker: waker.clone(),
                lead: None,
            },
            waker,
        ))
    }

    /// Makes this the lead thread.
    pub fn lead(&mut self, mut lead: Lead) -> Result<()> {
        let registry = self.poll.registry();
        registry.register(&mut lead.signals, SIGNALS, Interest::READABLE)?;
        lead.control.register(registry)?;
        self.lead = Some(lead);
        Ok(())
    }

    /// Runs until told to stop (a signal for the lead, `Stop` for the others), then drains the
    /// sockets one last time and hands everything to the writer.
    pub fn run(mut self) -> Result<()> {
        let mut events = Events::with_capacity(256);
        let mut stop = false;
        while !stop {
            match self.poll.poll(&mut events, self.poll_timeout()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow!("polling: {e}")),
            }
            for event in events.iter() {
                match event.token() {
                    Token(i) if i < self.sockets.len() => self.readable[i] = true,
                    WAKER => stop |= self.handle_ctl()?,
                    SIGNALS => stop |= self.handle_signals(),
                    control::LISTENER => self.accept_control(),
                    token if control::is_conn(token) => self.read_control(token)?,
                    Token(_) => {}
                }
            }
            self.expire_control()?;
            let mut received = 0;
            for i in 0..self.sockets.len() {
                if self.readable[i] {
                    received += self.drain_socket(i, FAIR_CALLS)?;
                }
            }
            if self.may_rest && received > 0 && !self.readable.iter().any(|r| *r) {
                std::thread::sleep(REST);
                // What arrived during the rest raised readiness events; the next poll
                // returns them at once.
            }
            if self
                .batch_since
                .is_some_and(|since| since.elapsed() >= HANDOFF_DELAY)
            {
                self.hand_off()?;
            }
            if self.drops_due.is_some_and(|due| Instant::now() >= due) {
                self.read_drops();
            }
        }
        if let Some(lead) = &self.lead {
            for peer in &lead.peers {
                // A peer that already exited needs no telling.
                let _ = peer.ctl.send(IngestCtl::Stop);
                let _ = peer.waker.wake();
            }
        }
        self.drain_all()?;
        self.hand_off()
    }

    /// How long the next poll may wait: not at all while a socket may hold datagrams, else
    /// until a partly filled batch is due to the writer, drop counts are due to be read or a
    /// control connection is due to close.
    fn poll_timeout(&self) -> Option<Duration> {
        if self.readable.iter().any(|r| *r) {
            return Some(Duration::ZERO);
        }
        let handoff = self.batch_since.map(|since| since + HANDOFF_DELAY);
        let control = self.lead.as_ref().and_then(|l| l.control.next_deadline());
        handoff
            .into_iter()
            .chain(self.drops_due)
            .chain(control)
            .min()
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Reads up to `max_calls` batches from socket `i`; clears its readiness once its queue is
    /// empty: a call that found fewer datagrams than a batch holds emptied it, and any datagram
    /// queued after that raises a new readiness event (epoll is edge-triggered on every
    /// arrival), so no further call is needed to learn that it would block.
    /// Returns how many datagrams it read.
    fn drain_socket(&mut self, i: usize, max_calls: usize) -> Result<usize> {
        let mut received = 0;
        for _ in 0..max_calls {
            match self.recv.recv(&self.sockets[i]) {
                Ok(n) => {
                    received += n;
                    self.process(n)?;
                    if !self.drops_unread[i] {
                        self.drops_unread[i] = true;
                        self.drops_due
                            .get_or_insert(Instant::now() + DROPS_INTERVAL);
                    }
                    if n < self.recv.capacity() {
                        self.readable[i] = false;
                        return Ok(received);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable[i] = false;
                    return Ok(received);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Pending socket errors (e.g. ICMP reports) do not stop the service.
                    log::warn!("receiving on {:?}: {e}", self.sockets[i].local_addr());
                    return Ok(received);
                }
            }
        }
        Ok(received)
    }

    /// Drains every socket and reads every drop count: afterwards the counters hold every
    /// datagram that was in a socket and every one the kernel dropped before.
    fn drain_all(&mut self) -> Result<()> {
        for i in 0..self.sockets.len() {
            self.drain_socket(i, DRAIN_CALLS)?;
            self.drops_unread[i] = true;
        }
        self.read_drops();
        Ok(())
    }

    /// Adds what each socket that received since its last reading dropped since then.
    fn read_drops(&mut self) {
        for i in 0..self.sockets.len() {
            if !std::mem::take(&mut self.drops_unread[i]) {
                continue;
            }
            match sys::socket_drops(&self.sockets[i]) {
                Ok(drops) => {
                    let last = &mut self.last_drops[i];
                    self.local.kernel_drops += u64::from(drops.wrapping_sub(*last));
                    *last = drops;
                }
                Err(e) => log::warn!("reading the drop count of a UDP socket: {e}"),
            }
        }
        self.drops_due = None;
        self.local.publish(&self.counters);
    }

    /// Validates the `n` datagrams just received.
    fn process(&mut self, n: usize) -> Result<()> {
        let now = u32::try_from(unix_now()).unwrap_or(u32::MAX);
        for i in 0..n {
            let datagram = self.recv.get(i);
            let verdict = if datagram.truncated {
                Err(Reject::Oversize)
            } else {
                wire::decode(datagram.bytes)
            };
            self.local.datagrams_received += 1;
            match verdict {
                Ok(event) => {
                    if self.batch.is_empty() {
                        self.batch_since = Some(Instant::now());
                    }
                    self.batch.push(Record {
                        app: event.app,
                        ip: event.ip,
                        unix_secs: now,
                    });
                    if self.batch.len() >= BATCH_RECORDS {
                        self.hand_off()?;
                    }
                }
                Err(reason) => self.local.rejected[reason.index()] += 1,
            }
        }
        self.local.publish(&self.counters);
        Ok(())
    }

    /// Sends the current batch to the writer and takes an empty one from the pool, waiting
    /// for one when the writer is behind.
    fn hand_off(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let empty = self
            .free
            .take()
            .ok_or_else(|| anyhow!("the writer has stopped"))?;
        let full = std::mem::replace(&mut self.batch, empty);
        self.batch_since = None;
        self.send(ToWriter::Batch(full))
    }

    fn send(&self, message: ToWriter) -> Result<()> {
        self.to_writer
            .send(message)
            .map_err(|_| anyhow!("the writer has stopped"))
    }

    /// Handles messages from the lead; true when told to stop.
    fn handle_ctl(&mut self) -> Result<bool> {
        while let Ok(message) = self.ctl.try_recv() {
            match message {
                IngestCtl::Drain(request) => {
                    self.drain_all()?;
                    self.hand_off()?;
                    self.send(ToWriter::Marker { request })?;
                }
                IngestCtl::Stop => return Ok(true),
            }
        }
        Ok(false)
    }

    fn handle_signals(&mut self) -> bool {
        let Some(lead) = self.lead.as_mut() else {
            return false;
        };
        let mut stop = false;
        for signal in lead.signals.pending() {
            let name = if signal == SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            log::info!("{name}: draining the sockets and flushing before exit");
            stop = true;
        }
        stop
    }

    fn accept_control(&mut self) {
        if let Some(lead) = self.lead.as_mut() {
            lead.control.accept(self.poll.registry());
        }
    }

    fn read_control(&mut self, token: Token) -> Result<()> {
        let Some(lead) = self.lead.as_mut() else {
            return Ok(());
        };
        for op in lead.control.read(token, self.poll.registry()) {
            self.forward(op)?;
        }
        Ok(())
    }

    /// Closes control connections that outlived their deadline, ending their resets.
    fn expire_control(&mut self) -> Result<()> {
        let Some(lead) = self.lead.as_mut() else {
            return Ok(());
        };
        for op in lead.control.expire(self.poll.registry()) {
            self.forward(op)?;
        }
        Ok(())
    }

    /// Queues `op` for the writer behind everything every ingest thread drains for it.
    fn forward(&mut self, op: Op) -> Result<()> {
        let lead = self.lead.as_mut().expect("only the lead forwards requests");
        let id = lead.control.next_id();
        let markers = lead.drain_peers(id);
        self.drain_all()?;
        self.hand_off()?;
        self.send(ToWriter::Request(Request { id, markers, op }))
    }
}
