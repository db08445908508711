//! Sending datagrams to a receiver without giving the kernel a reason to drop any: a test
//! that counts exactly must not depend on a loaded machine keeping up with a flood.

use std::net::{SocketAddr, UdpSocket};

use ipevent_core::stats::ReceiverStats;
use ipevent_core::DataDir;

use crate::{sender, wait_for, Receiver};

/// What the kernel charges a socket's receive buffer for one datagram of `len` bytes, at
/// most: the packet's buffer (payload and headers, rounded up to a power of two) and its
/// bookkeeping.
fn charged_bytes(len: usize) -> u64 {
    ((len + 1024).next_power_of_two() + 1024) as u64
}

/// Loopback packets the kernel queues per CPU before they reach a socket
/// (`net.core.netdev_max_backlog`); beyond it, it drops them without counting them anywhere a
/// receiver sees.
fn netdev_backlog() -> u64 {
    std::fs::read_to_string("/proc/sys/net/core/netdev_max_backlog")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1000)
}

/// How many datagrams of up to `datagram_max_bytes` may be unread by a receiver whose socket
/// was granted `rcvbuf_bytes` (its `rcvbuf_bytes` in stats) without the kernel ever having a
/// reason to drop one: they fill at most half its buffer and half the kernel's loopback
/// backlog, however late the receiver reads them. At least 1.
pub fn window_datagrams(rcvbuf_bytes: u64, datagram_max_bytes: usize) -> u64 {
    (rcvbuf_bytes / 2 / charged_bytes(datagram_max_bytes))
        .min(netdev_backlog() / 2)
        .max(1)
}

/// Sends datagrams to a receiver so that the kernel has no reason to drop any, however loaded
/// the machine: once a window of them ([`window_datagrams`]) may be unread, it waits until the
/// receiver's stats show every datagram sent so far read, then goes on. The receiver must
/// get no other datagrams, and its stats interval sets how long each wait takes.
pub struct PacedSender {
    socket: UdpSocket,
    to: SocketAddr,
    data: DataDir,
    writer_id: String,
    window: u64,
    /// Datagrams the receiver's stats showed read.
    confirmed: u64,
    sent: u64,
}

impl PacedSender {
    /// A sender to `rx` for datagrams of up to `datagram_max_bytes`.
    pub fn new(rx: &Receiver, datagram_max_bytes: usize) -> PacedSender {
        let stats = rx.stats().expect("the receiver's stats");
        let rcvbuf_bytes = stats.rcvbuf_bytes.iter().copied().min().unwrap_or(0);
        PacedSender {
            socket: sender(),
            to: rx.addr,
            data: rx.data.clone(),
            writer_id: rx.writer_id.clone(),
            window: window_datagrams(rcvbuf_bytes, datagram_max_bytes),
            confirmed: 0,
            sent: 0,
        }
    }

    /// Sends one datagram (of at most the size given to [`PacedSender::new`]), first waiting
    /// for the receiver to read the last window when it is full.
    pub fn send(&mut self, datagram: &[u8]) {
        self.make_room();
        self.socket
            .send_to(datagram, self.to)
            .expect("sending a datagram");
        self.sent += 1;
    }

    /// [`PacedSender::send`] from another socket (another flow, for a receiver with several
    /// ingest threads).
    pub fn send_from(&mut self, socket: &UdpSocket, datagram: &[u8]) {
        self.make_room();
        socket
            .send_to(datagram, self.to)
            .expect("sending a datagram");
        self.sent += 1;
    }

    fn make_room(&mut self) {
        if self.sent - self.confirmed == self.window {
            self.wait_read();
        }
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Waits until the receiver's stats show every datagram sent so far read, and each one
    /// accepted or rejected, and returns them. Fails if the kernel dropped any: within a
    /// window it has no reason to.
    pub fn wait_read(&mut self) -> ReceiverStats {
        let sent = self.sent;
        let stats = wait_for("the receiver to read every datagram sent", || {
            ReceiverStats::read(&self.data, &self.writer_id)
                .ok()
                .filter(|s| {
                    s.datagrams_received + s.kernel_drops >= sent
                        && s.events_accepted + s.rejected_total >= s.datagrams_received
                })
        });
        assert_eq!(
            stats.kernel_drops, 0,
            "the kernel dropped datagrams although at most {} were unread (receive buffer {:?})",
            self.window, stats.rcvbuf_bytes
        );
        self.confirmed = sent;
        stats
    }
}
