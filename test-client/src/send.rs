//! Sending batches: target resolution, `sendmmsg` with retries, and the rate limiter.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipevent_core::sys::SendBatch;

/// How long the sender keeps retrying one datagram the kernel refuses for a transient
/// reason (full send buffer, `ENOBUFS`) before it counts it as a send error and moves on.
pub const SEND_STALL_LIMIT_MS: u64 = 5_000;

/// Longest pause between two retries of a refused send.
const RETRY_PAUSE_MAX_US: u64 = 1_000;

/// Resolves every `HOST:PORT` to all of its addresses, in the resolver's order, without
/// repeats. A name with several addresses is spread over all of them, as devices do with
/// DNS round robin.
pub fn resolve_targets(targets: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for target in targets {
        let addrs = target
            .to_socket_addrs()
            .with_context(|| format!("resolving target {target} (expected HOST:PORT)"))?;
        let before = out.len();
        for addr in addrs {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        if out.len() == before {
            log::debug!("{target} resolved only to addresses already listed");
        }
    }
    if out.is_empty() {
        bail!(
            "no target address: {} resolved to nothing",
            targets.join(", ")
        );
    }
    Ok(out)
}

/// What went wrong while sending, for the summary.
#[derive(Clone, Debug, Default)]
pub struct SendErrors {
    /// Datagrams given up on, per error message.
    pub by_error: BTreeMap<String, u64>,
    /// Datagrams given up on, all errors together.
    pub total: u64,
    /// Calls retried after a transient refusal (`EAGAIN`, `ENOBUFS`, `EINTR`).
    pub retries: u64,
}

impl SendErrors {
    /// Waits before a retry; returns true when the datagram has stalled too long and was
    /// counted as an error instead.
    fn retry_or_give_up(
        &mut self,
        error: &io::Error,
        stalled_since: &mut Option<Instant>,
        pause_us: &mut u64,
    ) -> bool {
        let since = *stalled_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= Duration::from_millis(SEND_STALL_LIMIT_MS) {
            self.count(format!("gave up after {SEND_STALL_LIMIT_MS} ms: {error}"));
            *stalled_since = None;
            *pause_us = 0;
            return true;
        }
        self.retries += 1;
        if *pause_us == 0 {
            std::thread::yield_now();
            *pause_us = 10;
        } else {
            std::thread::sleep(Duration::from_micros(*pause_us));
            *pause_us = (*pause_us * 2).min(RETRY_PAUSE_MAX_US);
        }
        false
    }

    fn count(&mut self, message: String) {
        self.total += 1;
        *self.by_error.entry(message).or_default() += 1;
    }
}

/// Sends batches round robin over the targets, one target per batch.
pub struct Sender {
    targets: Vec<SocketAddr>,
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    batch: SendBatch,
    next_target: usize,
    /// Errors so far.
    pub errors: SendErrors,
}

fn bind(addr: &str) -> anyhow::Result<UdpSocket> {
    UdpSocket::bind(addr).with_context(|| format!("binding a sending socket on {addr}"))
}

impl Sender {
    /// A sender to `targets` (not empty) for batches of up to `capacity` datagrams.
    pub fn new(targets: Vec<SocketAddr>, capacity: usize) -> anyhow::Result<Sender> {
        assert!(!targets.is_empty(), "a sender needs a target");
        let v4 = match targets.iter().any(SocketAddr::is_ipv4) {
            true => Some(bind("0.0.0.0:0")?),
            false => None,
        };
        let v6 = match targets.iter().any(SocketAddr::is_ipv6) {
            true => Some(bind("[::]:0")?),
            false => None,
        };
        Ok(Sender {
            targets,
            v4,
            v6,
            batch: SendBatch::new(capacity),
            next_target: 0,
            errors: SendErrors::default(),
        })
    }

    /// The addresses datagrams go to.
    pub fn targets(&self) -> &[SocketAddr] {
        &self.targets
    }

    /// Sends every datagram of `datagrams` to the next target, calling `on_sent(i)` for each
    /// one the kernel took. Transient refusals are retried with a growing pause; any other
    /// error, or a refusal lasting [`SEND_STALL_LIMIT_MS`], is counted in [`Sender::errors`]
    /// and that one datagram is skipped. Nothing is dropped without being counted.
    pub fn send(&mut self, datagrams: &[&[u8]], mut on_sent: impl FnMut(usize)) {
        let to = self.targets[self.next_target];
        self.next_target = (self.next_target + 1) % self.targets.len();
        let socket = match to {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
        .expect("a socket for every target family");
        let mut pos = 0;
        let mut stalled_since: Option<Instant> = None;
        let mut pause_us = 0u64;
        while pos < datagrams.len() {
            let result = self.batch.send(socket, &datagrams[pos..], to);
            match result {
                Ok(n) if n > 0 => {
                    for i in pos..pos + n {
                        on_sent(i);
                    }
                    pos += n;
                    stalled_since = None;
                    pause_us = 0;
                }
                Ok(_) => {
                    // The kernel took nothing without saying why: retry like a full buffer.
                    let error = io::Error::from(io::ErrorKind::WouldBlock);
                    if self
                        .errors
                        .retry_or_give_up(&error, &mut stalled_since, &mut pause_us)
                    {
                        pos += 1;
                    }
                }
                Err(error) if is_transient(&error) => {
                    if self
                        .errors
                        .retry_or_give_up(&error, &mut stalled_since, &mut pause_us)
                    {
                        pos += 1;
                    }
                }
                Err(error) => {
                    log::debug!("sending to {to}: {error}");
                    self.errors.count(format!("sending to {to}: {error}"));
                    pos += 1;
                }
            }
        }
    }
}

/// Errors that mean "not now": a full socket buffer, a full device queue, a signal.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    ) || error.raw_os_error() == Some(libc::ENOBUFS)
}

/// A token bucket in datagrams: tokens accrue at `per_sec`, up to `burst`; a batch waits
/// until there are tokens for all of it. Because tokens accrue from elapsed time, short
/// oversleeps are made up by the next batches and the average rate stays exact.
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket for `per_sec` datagrams per second (more than 0) that holds at most `burst`.
    pub fn new(per_sec: u64, burst: usize) -> TokenBucket {
        assert!(per_sec > 0 && burst > 0);
        TokenBucket {
            per_sec: per_sec as f64,
            burst: burst as f64,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Waits until `n` datagrams may go, and takes their tokens.
    pub fn take(&mut self, n: usize) {
        let n = n as f64;
        loop {
            let now = Instant::now();
            let elapsed = now.duration_since(self.last).as_secs_f64();
            self.last = now;
            self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst.max(n));
            if self.tokens >= n {
                self.tokens -= n;
                return;
            }
            let wait = (n - self.tokens) / self.per_sec;
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolving_keeps_every_address_once() {
        let targets = vec![
            "127.0.0.1:9".to_string(),
            "127.0.0.1:9".to_string(),
            "[::1]:9".to_string(),
        ];
        let addrs = resolve_targets(&targets).unwrap();
        assert_eq!(
            addrs,
            vec!["127.0.0.1:9".parse().unwrap(), "[::1]:9".parse().unwrap()]
        );
        let err = resolve_targets(&["no-port-here".to_string()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("resolving target no-port-here"),
            "{err:#}"
        );
    }

    #[test]
    fn sender_round_robins_batches_over_targets() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let targets = vec![a.local_addr().unwrap(), b.local_addr().unwrap()];
        let mut sender = Sender::new(targets, 8).unwrap();
        let mut sent = 0;
        for round in 0..4u8 {
            let payload = [round];
            sender.send(&[&payload, &payload], |_| sent += 1);
        }
        assert_eq!(sent, 8);
        assert_eq!(sender.errors.total, 0);
        let mut buf = [0u8; 4];
        for socket in [&a, &b] {
            socket
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
        }
        for (socket, rounds) in [(&a, [0u8, 0, 2, 2]), (&b, [1, 1, 3, 3])] {
            for want in rounds {
                let (n, _) = socket.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], &[want]);
            }
        }
    }
}
