//! The receiver's side of the control socket (the protocol is `ipevent_core::control`).
//!
//! The lead ingest thread owns the listener and every open connection, in a fixed number of
//! slots polled by its `Poll`. It answers `ping` and bad requests itself; `sync`, `reset-begin`,
//! `forget <sha>` and `reset-end` become a [`Request`] for the writer, queued behind everything the ingest
//! threads drained for it. The writer answers on the connection.
//!
//! Limits, so that no client can keep others out:
//! - a connection has [`REQUEST_TIMEOUT`] to send its request line, then it is closed;
//! - when all [`MAX_CONTROL_CONNS`] slots are taken, a new connection closes the one that has
//!   waited longest for its request line (counted as `control_conns_full`);
//! - a connection that began a reset (or a forget) holds the writer's flushes until it sends
//!   `reset-end` or closes, and at most [`RESET_LEASE`]: then the hold ends as if it had closed;
//! - the socket is created with mode 0600: only the receiver's own user may connect.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipevent_core::control::{Command, Pong, Reply, MAX_REQUEST_BYTES};
use ipevent_core::AppSha;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::counters::Counters;

/// Control connections open at once. Each is a few hundred bytes and one descriptor; a sync
/// takes a slot for a few milliseconds, so 16 leave room for many concurrent readers.
pub const MAX_CONTROL_CONNS: usize = 16;

/// How long a connection may take to send its request line. Clients send it as soon as they
/// are connected; this only bounds idle or trickling connections.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a reset may hold flushes. A reset renames one directory, so it needs milliseconds;
/// past this the client is taken to be stuck (stopped by a signal), and the hold ends.
pub const RESET_LEASE: Duration = Duration::from_secs(30);

/// Syncs that may wait for a reset's hold to end; more are refused. Each keeps its connection
/// open, and a hold lasts milliseconds, so only a client looping on syncs reaches this.
pub const MAX_HELD_SYNCS: usize = 1024;

/// Longest path a Unix socket address holds on Linux (`sun_path` less its NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Mode of the control socket: connecting to it can reset the store.
const SOCKET_MODE: u32 = 0o600;

/// The listener's token in the lead's `Poll`.
pub const LISTENER: Token = Token((1 << 20) + 2);

/// Connection slot `i` has token `CONN_BASE + i`.
const CONN_BASE: usize = 1 << 21;

/// True when `token` is one of a control connection.
pub fn is_conn(token: Token) -> bool {
    (CONN_BASE..CONN_BASE + MAX_CONTROL_CONNS).contains(&token.0)
}

/// Binds the control socket at `path` with mode [`SOCKET_MODE`], replacing one a previous run
/// left behind (the caller holds the writer's lock). The socket is bound and set up under a
/// temporary name and renamed into place, so it is never reachable with a wider mode.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let temp = path.with_extension("tmp");
    for p in [path, temp.as_path()] {
        let len = p.as_os_str().len();
        if len > MAX_SOCKET_PATH_BYTES {
            bail!(
                "control socket path {} is {len} bytes, over the {MAX_SOCKET_PATH_BYTES}-byte limit of Unix sockets; use a shorter --data-dir",
                p.display()
            );
        }
    }
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", temp.display())),
    }
    let listener = UnixListener::bind(&temp)
        .with_context(|| format!("binding control socket {}", temp.display()))?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .with_context(|| format!("setting the mode of {}", temp.display()))?;
    std::fs::rename(&temp, path)
        .with_context(|| format!("moving the control socket into place at {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A control request for the writer. It runs once `markers` ingest threads have sent their
/// marker for it, and after every request with a lower id.
pub struct Request {
    pub id: u64,
    pub markers: usize,
    pub op: Op,
}

/// What the writer does for a request.
pub enum Op {
    /// Flush everything and answer (once no reset holds flushes).
    Sync { reply: UnixStream },
    /// Drop what is pending, zero the counters and hold flushes until `EndHold` with the
    /// same `hold`.
    BeginHold { hold: u64, reply: UnixStream },
    /// Flush everything, forget what the store writer knows of `app`'s log and hold flushes
    /// until `EndHold` with the same `hold` (`forget <sha>`; `forget-shipped <sha>` when
    /// `shipped`, from a forget of the bucket).
    BeginForget {
        hold: u64,
        app: AppSha,
        shipped: bool,
        reply: UnixStream,
    },
    /// End hold `hold`: asked for (`reset-end`, with a connection to answer on), or because
    /// its connection closed or outlived its lease (no answer).
    EndHold {
        hold: u64,
        reply: Option<UnixStream>,
    },
}

/// Writes `reply` on `stream` without waiting: a reply is one short line into an empty
/// socket buffer, so it only fails when the client has gone (logged, not an error).
pub fn answer(stream: &UnixStream, reply: &Reply) {
    if let Err(e) = (&*stream).write_all(reply.line().as_bytes()) {
        log::debug!("control client went away before its answer: {e}");
    }
}

/// One open control connection.
struct Conn {
    stream: UnixStream,
    buf: [u8; MAX_REQUEST_BYTES],
    len: usize,
    /// When it is closed: [`REQUEST_TIMEOUT`] after it was accepted, or [`RESET_LEASE`] after
    /// its reset began.
    deadline: Instant,
    /// The reset this connection holds, once it sent `reset-begin`.
    hold: Option<u64>,
}

/// What reading a connection came to.
enum LineRead {
    /// A request line.
    Line(String),
    /// Nothing whole yet.
    Partial,
    /// Closed, failed, or sent a line too long (answered).
    Gone,
}

/// The listener and the open connections.
pub struct Control {
    listener: UnixListener,
    conns: Vec<Option<Conn>>,
    writer_id: String,
    counters: Arc<Counters>,
    next_request: u64,
}

impl Control {
    pub fn new(listener: UnixListener, writer_id: String, counters: Arc<Counters>) -> Control {
        Control {
            listener,
            conns: (0..MAX_CONTROL_CONNS).map(|_| None).collect(),
            writer_id,
            counters,
            next_request: 0,
        }
    }

    /// Registers the listener with the lead's `Poll`.
    pub fn register(&self, registry: &Registry) -> io::Result<()> {
        registry.register(
            &mut SourceFd(&self.listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )
    }

    /// Accepts every waiting connection, making room when all slots are taken.
    pub fn accept(&mut self, registry: &Registry) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("accepting a control connection: {e}");
                    return;
                }
            };
            let Some(slot) = self.free_slot(registry) else {
                answer(
                    &stream,
                    &Reply::Refused("too many control connections hold resets".into()),
                );
                continue;
            };
            let registered = stream.set_nonblocking(true).and_then(|()| {
                registry.register(
                    &mut SourceFd(&stream.as_raw_fd()),
                    Token(CONN_BASE + slot),
                    Interest::READABLE,
                )
            });
            match registered {
                Ok(()) => {
                    self.conns[slot] = Some(Conn {
                        stream,
                        buf: [0; MAX_REQUEST_BYTES],
                        len: 0,
                        deadline: Instant::now() + REQUEST_TIMEOUT,
                        hold: None,
                    })
                }
                Err(e) => log::warn!("registering a control connection: {e}"),
            }
        }
    }

    /// A free slot; when there is none, the one of the connection that has waited longest for
    /// its request line, closed for it. `None` when every connection holds a reset.
    fn free_slot(&mut self, registry: &Registry) -> Option<usize> {
        if let Some(slot) = self.conns.iter().position(Option::is_none) {
            return Some(slot);
        }
        self.counters.control_conns_full.fetch_add(1, Relaxed);
        let oldest = (0..self.conns.len())
            .filter(|&i| self.conns[i].as_ref().is_some_and(|c| c.hold.is_none()))
            .min_by_key(|&i| self.conns[i].as_ref().map(|c| c.deadline))?;
        let conn = self.close(oldest, registry);
        answer(
            &conn.stream,
            &Reply::Refused("closed to make room for another control connection".into()),
        );
        Some(oldest)
    }

    /// Deregisters and removes the connection in `slot`.
    fn close(&mut self, slot: usize, registry: &Registry) -> Conn {
        let conn = self.conns[slot].take().expect("an open slot");
        let _ = registry.deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
        conn
    }

    /// Reads what the connection of `token` sent. Returns the writer's part of its requests,
    /// in order; `ping` and bad requests are answered here. Reads until the socket would
    /// block: readiness is edge-triggered, so a close that arrived with `reset-begin` would
    /// not be reported again.
    pub fn read(&mut self, token: Token, registry: &Registry) -> Vec<Op> {
        let mut ops = Vec::new();
        let Some(slot) = token.0.checked_sub(CONN_BASE) else {
            return ops;
        };
        while let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            let read = read_line(conn);
            let hold = conn.hold;
            match (read, hold) {
                (LineRead::Partial, _) => break,
                (LineRead::Gone, None) => {
                    self.close(slot, registry);
                }
                // The client closed the connection: its reset is over.
                (LineRead::Gone, Some(hold)) => {
                    self.close(slot, registry);
                    ops.push(Op::EndHold { hold, reply: None });
                }
                (LineRead::Line(line), Some(hold)) => {
                    let conn = self.close(slot, registry);
                    let reply = if Command::parse(&line) == Some(Command::ResetEnd) {
                        Some(conn.stream)
                    } else {
                        answer(
                            &conn.stream,
                            &Reply::Refused(format!(
                                "{line:?} after reset-begin: only reset-end may follow; the reset is ended"
                            )),
                        );
                        None
                    };
                    ops.push(Op::EndHold { hold, reply });
                }
                (LineRead::Line(line), None) => ops.extend(self.request(slot, &line, registry)),
            }
        }
        ops
    }

    /// Serves or forwards the first request line of the connection in `slot`.
    fn request(&mut self, slot: usize, line: &str, registry: &Registry) -> Option<Op> {
        let command = Command::parse(line);
        if let Some(
            begin @ (Command::ResetBegin | Command::Forget(_) | Command::ForgetShipped(_)),
        ) = command
        {
            let hold = self.next_id();
            let conn = self.conns[slot].as_mut().expect("an open slot");
            let reply = match conn.stream.try_clone() {
                Ok(reply) => reply,
                Err(e) => {
                    let conn = self.close(slot, registry);
                    answer(&conn.stream, &Reply::Refused(format!("reset-begin: {e}")));
                    return None;
                }
            };
            conn.hold = Some(hold);
            conn.deadline = Instant::now() + RESET_LEASE;
            return Some(match begin {
                Command::Forget(app) => Op::BeginForget {
                    hold,
                    app,
                    shipped: false,
                    reply,
                },
                Command::ForgetShipped(app) => Op::BeginForget {
                    hold,
                    app,
                    shipped: true,
                    reply,
                },
                _ => Op::BeginHold { hold, reply },
            });
        }
        let stream = self.close(slot, registry).stream;
        match command {
            Some(Command::Sync) => Some(Op::Sync { reply: stream }),
            Some(Command::Ping) => {
                answer(
                    &stream,
                    &Reply::Pong(Pong {
                        writer_id: self.writer_id.clone(),
                        pid: std::process::id(),
                        version: ipevent_core::VERSION.to_string(),
                    }),
                );
                None
            }
            Some(Command::ResetEnd) => {
                answer(
                    &stream,
                    &Reply::Refused(
                        "reset-end goes on the connection that sent reset-begin".into(),
                    ),
                );
                None
            }
            Some(Command::ResetBegin | Command::Forget(_) | Command::ForgetShipped(_)) => {
                unreachable!("handled above")
            }
            None => {
                answer(
                    &stream,
                    &Reply::Refused(format!("unknown request {line:?}")),
                );
                None
            }
        }
    }

    /// A new request id (ids order requests at the writer).
    pub fn next_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// When the next connection is due to be closed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().flatten().map(|c| c.deadline).min()
    }

    /// Closes every connection past its deadline; returns the holds that ended with them.
    pub fn expire(&mut self, registry: &Registry) -> Vec<Op> {
        let now = Instant::now();
        let mut ended = Vec::new();
        for slot in 0..self.conns.len() {
            if self.conns[slot].as_ref().is_none_or(|c| c.deadline > now) {
                continue;
            }
            let conn = self.close(slot, registry);
            match conn.hold {
                Some(hold) => {
                    log::warn!(
                        "a reset held flushes for {RESET_LEASE:?} without finishing; resuming"
                    );
                    answer(
                        &conn.stream,
                        &Reply::Refused(format!("the reset outlived its {RESET_LEASE:?} lease")),
                    );
                    ended.push(Op::EndHold { hold, reply: None });
                }
                None => answer(
                    &conn.stream,
                    &Reply::Refused(format!("no request within {REQUEST_TIMEOUT:?}")),
                ),
            }
        }
        ended
    }
}

/// The next request line of `conn`: one it already sent, or read until a whole line is
/// there, it would block, or it ends.
fn read_line(conn: &mut Conn) -> LineRead {
    loop {
        if let Some(end) = conn.buf[..conn.len].iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&conn.buf[..end]).into_owned();
            conn.buf.copy_within(end + 1..conn.len, 0);
            conn.len -= end + 1;
            return LineRead::Line(line);
        }
        if conn.len == conn.buf.len() {
            answer(
                &conn.stream,
                &Reply::Refused("request line too long".into()),
            );
            return LineRead::Gone;
        }
        match conn.stream.read(&mut conn.buf[conn.len..]) {
            Ok(0) => return LineRead::Gone,
            Ok(n) => conn.len += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineRead::Partial,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return LineRead::Gone,
        }
    }
}
