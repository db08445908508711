//! The control channel: a Unix socket per running receiver, through which other tools ask it
//! to drain its sockets and flush (read after write) or to reset (a clean reset). This module
//! is the whole protocol: the requests, the typed replies and how both are written on the
//! socket, the client, and [`sync_all`], which every reader uses before it reads.
//!
//! A connection carries one request line and one reply line:
//!
//! ```text
//! request:  ping | sync | reset-begin | forget <sha> | reset-end
//! reply:    ok <json>   |   err <message>
//! ```
//!
//! `sync` answers once everything that reached the receiver's sockets before the request is in
//! the store; while a reset holds the receiver's flushes, it waits for the hold to end, so an
//! `ok` always means "flushed". `reset-begin` drains, discards what is pending, zeroes the
//! counters and holds flushes for as long as its connection stays open: the client sends
//! `reset-end` on the same connection when it is done, and a client that dies (or closes the
//! connection) ends the hold with it ([`Hold`]). A receiver also ends a hold that outlives its
//! lease. `forget <sha>` (one app forgotten, [`crate::forget`]) drains and flushes everything
//! instead of discarding it, so that its journal no longer holds the app, makes its store
//! writer forget what it knew of the app's log, and then holds flushes exactly as
//! `reset-begin` does, ended by `reset-end` or the connection's close.
//!
//! The socket is bound before the receiver binds its UDP sockets or replays its journal, so a
//! receiver that is starting already accepts connections: a request made then waits (up to the
//! client's timeout) for the receiver to be ready instead of finding nobody there.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::DataDir;
use crate::wire::AppSha;

/// Longest request line a receiver reads: `forget` and an app's SHA-256 in hex, with room.
pub const MAX_REQUEST_BYTES: usize = 128;

/// Longest reply line a client reads.
const MAX_REPLY_BYTES: u64 = 4096;

/// A request to a receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Is it alive; who is it.
    Ping,
    /// Drain the sockets and flush everything received.
    Sync,
    /// Drain, drop everything pending, zero the counters, hold flushes while the connection
    /// stays open.
    ResetBegin,
    /// Resume flushing after a reset (on the connection that sent `reset-begin`).
    ResetEnd,
    /// Drain, flush everything, forget what is known of this app's log, hold flushes while the
    /// connection stays open (ended by `reset-end`, as a reset is).
    Forget(AppSha),
    /// `forget` for a forget of the bucket the receiver ships to (its shipper sends it, then
    /// removes the app from its outbox and database): accepted with `--store` too, where a
    /// plain `forget` is refused because the bucket would keep the app.
    ForgetShipped(AppSha),
}

impl Command {
    /// The request word.
    pub fn word(self) -> &'static str {
        match self {
            Command::Ping => "ping",
            Command::Sync => "sync",
            Command::ResetBegin => "reset-begin",
            Command::ResetEnd => "reset-end",
            Command::Forget(_) => "forget",
            Command::ForgetShipped(_) => "forget-shipped",
        }
    }

    /// Parses a request line (without its newline).
    pub fn parse(line: &str) -> Option<Command> {
        if let Some(sha) = line.trim().strip_prefix("forget ") {
            return sha.trim().parse().ok().map(Command::Forget);
        }
        if let Some(sha) = line.trim().strip_prefix("forget-shipped ") {
            return sha.trim().parse().ok().map(Command::ForgetShipped);
        }
        [
            Command::Ping,
            Command::Sync,
            Command::ResetBegin,
            Command::ResetEnd,
        ]
        .into_iter()
        .find(|c| c.word() == line.trim())
    }

    /// The request as sent on the socket.
    pub fn line(self) -> String {
        match self {
            Command::Forget(app) | Command::ForgetShipped(app) => {
                format!("{} {app}\n", self.word())
            }
            _ => format!("{}\n", self.word()),
        }
    }
}

/// The answer to `ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The receiver's writer id.
    pub writer_id: String,
    /// Its process id.
    pub pid: u32,
    /// Its version.
    pub version: String,
}

/// The answer to `sync`: everything received before the request is in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Synced {
    /// The receiver's flush epoch after the flush.
    pub epoch: u64,
}

/// The answer to `reset-begin`: flushes are held until `reset-end` or the connection closes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetBegun {
    /// Pending events the reset discarded.
    pub dropped_pending: u64,
}

/// The answer to `reset-end`: flushes resumed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetEnded {
    /// The receiver's flush epoch.
    pub epoch: u64,
}

/// The answer to `forget <sha>`: everything received before the request is flushed (the
/// receiver's journal no longer holds the app), and flushes are held until `reset-end` or the
/// connection closes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetBegun {
    /// The receiver's flush epoch after the flush.
    pub epoch: u64,
}

/// A reply line, typed. [`Reply::line`] is the only place replies are written and
/// [`Reply::parse`] the only place they are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `ok` to `ping`.
    Pong(Pong),
    /// `ok` to `sync`.
    Synced(Synced),
    /// `ok` to `reset-begin`.
    ResetBegun(ResetBegun),
    /// `ok` to `reset-end`.
    ResetEnded(ResetEnded),
    /// `ok` to `forget <sha>`.
    ForgetBegun(ForgetBegun),
    /// `err`: the request was not carried out, and why.
    Refused(String),
}

impl Reply {
    /// The reply as written on the socket: one line, `ok <json>` or `err <message>`.
    pub fn line(&self) -> String {
        let body = match self {
            Reply::Pong(pong) => serde_json::to_string(pong),
            Reply::Synced(synced) => serde_json::to_string(synced),
            Reply::ResetBegun(begun) => serde_json::to_string(begun),
            Reply::ResetEnded(ended) => serde_json::to_string(ended),
            Reply::ForgetBegun(begun) => serde_json::to_string(begun),
            Reply::Refused(message) => return format!("err {}\n", message.replace('\n', " ")),
        };
        format!("ok {}\n", body.expect("replies serialise"))
    }

    /// Reads the reply to `command` from `line` (with or without its newline). A refusal is
    /// [`ControlError::Refused`].
    pub fn parse(command: Command, line: &str) -> Result<Reply, ControlError> {
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            return Err(ControlError::Closed);
        }
        if let Some(message) = line.strip_prefix("err ") {
            return Err(ControlError::Refused(message.to_string()));
        }
        let Some(body) = line.strip_prefix("ok ") else {
            return Err(ControlError::Malformed(line.to_string()));
        };
        fn body_of<T: DeserializeOwned>(line: &str, body: &str) -> Result<T, ControlError> {
            serde_json::from_str(body).map_err(|_| ControlError::Malformed(line.to_string()))
        }
        Ok(match command {
            Command::Ping => Reply::Pong(body_of(line, body)?),
            Command::Sync => Reply::Synced(body_of(line, body)?),
            Command::ResetBegin => Reply::ResetBegun(body_of(line, body)?),
            Command::ResetEnd => Reply::ResetEnded(body_of(line, body)?),
            Command::Forget(_) | Command::ForgetShipped(_) => {
                Reply::ForgetBegun(body_of(line, body)?)
            }
        })
    }
}

/// Why a request got no `ok`.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No receiver listens on that socket (no file, or nobody accepting).
    #[error("no receiver is running there")]
    NotRunning,
    /// The receiver did not answer in time.
    #[error(
        "the receiver did not answer within {0:?} (it may be busy starting: replaying its \
         journal, or stopped by a signal)"
    )]
    Timeout(Duration),
    /// The receiver closed the connection without answering (it was stopping).
    #[error("the receiver closed the connection without answering")]
    Closed,
    /// The receiver answered with an error.
    #[error("the receiver refused: {0}")]
    Refused(String),
    /// The receiver answered something that is not a reply to the request.
    #[error("unexpected reply {0:?}")]
    Malformed(String),
    /// Any other failure talking to it.
    #[error("talking to the receiver: {0}")]
    Io(#[from] io::Error),
}

/// Connects to the receiver listening at `socket`, with `timeout` on every read and write.
fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, ControlError> {
    let stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning);
        }
        Err(e) => return Err(e.into()),
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Sends `command` on `stream` and reads its reply.
fn exchange(
    stream: &UnixStream,
    command: Command,
    timeout: Duration,
) -> Result<Reply, ControlError> {
    let timed_out = |e: io::Error| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ControlError::Timeout(timeout)
        } else {
            ControlError::Io(e)
        }
    };
    match (&*stream).write_all(command.line().as_bytes()) {
        Ok(()) => {}
        // The receiver closed the connection before reading (it was stopping).
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(ControlError::Closed),
        Err(e) => return Err(timed_out(e)),
    }
    let mut line = String::new();
    match BufReader::new(stream.take(MAX_REPLY_BYTES)).read_line(&mut line) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ControlError::Closed),
        Err(e) => return Err(timed_out(e)),
    }
    Reply::parse(command, &line)
}

/// Sends `command` to the receiver listening at `socket` and returns its reply. A
/// `reset-begin` sent this way ends its hold as soon as the reply is read; use [`hold`].
pub fn request(socket: &Path, command: Command, timeout: Duration) -> Result<Reply, ControlError> {
    let stream = connect(socket, timeout)?;
    exchange(&stream, command, timeout)
}

/// Asks the receiver at `socket` who it is.
pub fn ping(socket: &Path, timeout: Duration) -> Result<Pong, ControlError> {
    match request(socket, Command::Ping, timeout)? {
        Reply::Pong(pong) => Ok(pong),
        other => Err(ControlError::Malformed(other.line())),
    }
}

/// A receiver's flushes held by a reset or a forget: they stay held while this value lives.
/// [`Hold::end`] resumes them; dropping it (or the death of the process that holds it) does
/// too.
#[derive(Debug)]
pub struct Hold {
    stream: UnixStream,
    /// What the receiver said when the hold began ([`Reply::ResetBegun`] or
    /// [`Reply::ForgetBegun`]).
    pub begun: Reply,
}

impl Hold {
    /// Sends `reset-end` and waits for the receiver to confirm that flushes resumed.
    pub fn end(self, timeout: Duration) -> Result<ResetEnded, ControlError> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        match exchange(&self.stream, Command::ResetEnd, timeout)? {
            Reply::ResetEnded(ended) => Ok(ended),
            other => Err(ControlError::Malformed(other.line())),
        }
    }
}

/// Begins a reset on the receiver at `socket`: it drains, drops what is pending, zeroes its
/// counters and holds flushes until the returned [`Hold`] ends or is dropped.
pub fn hold(socket: &Path, timeout: Duration) -> Result<Hold, ControlError> {
    begin_hold(socket, Command::ResetBegin, timeout)
}

/// Begins forgetting `app` on the receiver at `socket`: it drains, flushes everything, forgets
/// what it knew of the app's log and holds flushes until the returned [`Hold`] ends or is
/// dropped.
pub fn forget_hold(socket: &Path, app: &AppSha, timeout: Duration) -> Result<Hold, ControlError> {
    begin_hold(socket, Command::Forget(*app), timeout)
}

fn begin_hold(socket: &Path, command: Command, timeout: Duration) -> Result<Hold, ControlError> {
    let stream = connect(socket, timeout)?;
    match exchange(&stream, command, timeout)? {
        begun @ (Reply::ResetBegun(_) | Reply::ForgetBegun(_)) => Ok(Hold { stream, begun }),
        other => Err(ControlError::Malformed(other.line())),
    }
}

/// The answer of one receiver to a request sent to every receiver of a data dir.
#[derive(Debug)]
pub struct Answer<T> {
    /// The receiver's writer id.
    pub writer_id: String,
    /// Its reply.
    pub result: Result<T, ControlError>,
}

/// Calls `ask` with the control socket of every receiver that has a directory in `data`, and
/// returns the answers of those that are running (stale sockets of stopped receivers are left
/// out).
fn ask_all<T>(
    data: &DataDir,
    mut ask: impl FnMut(&Path) -> Result<T, ControlError>,
) -> io::Result<Vec<Answer<T>>> {
    let ids = data.writer_ids().map_err(io::Error::other)?;
    Ok(ids
        .into_iter()
        .filter_map(|writer_id| match ask(&data.control_socket(&writer_id)) {
            Err(ControlError::NotRunning) => None,
            result => Some(Answer { writer_id, result }),
        })
        .collect())
}

/// Sends `command` to every running receiver of `data`, one after the other.
pub fn request_all(
    data: &DataDir,
    command: Command,
    timeout: Duration,
) -> io::Result<Vec<Answer<Reply>>> {
    ask_all(data, |socket| request(socket, command, timeout))
}

/// Holds every running receiver of `data` ([`hold`] on each).
pub fn hold_all(data: &DataDir, timeout: Duration) -> io::Result<Vec<Answer<Hold>>> {
    ask_all(data, |socket| hold(socket, timeout))
}

/// Begins forgetting `app` on every running receiver of `data` ([`forget_hold`] on each);
/// `shipped`: for a forget of the bucket (`forget-shipped`).
pub fn forget_hold_all(
    data: &DataDir,
    app: &AppSha,
    shipped: bool,
    timeout: Duration,
) -> io::Result<Vec<Answer<Hold>>> {
    let command = if shipped {
        Command::ForgetShipped(*app)
    } else {
        Command::Forget(*app)
    };
    ask_all(data, |socket| begin_hold(socket, command, timeout))
}

/// What a [`sync_all`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Every running receiver drained and flushed.
    Ok,
    /// No receiver is running: the store on disk is all there is.
    None,
    /// At least one receiver did not confirm; what it holds in memory may be missing.
    Failed,
}

impl SyncOutcome {
    /// Every outcome, for metrics.
    pub const ALL: [SyncOutcome; 3] = [SyncOutcome::Ok, SyncOutcome::None, SyncOutcome::Failed];

    /// The name readers show (the API's `X-Ipevent-Sync` header, metrics labels).
    pub fn name(self) -> &'static str {
        match self {
            SyncOutcome::Ok => "ok",
            SyncOutcome::None => "none",
            SyncOutcome::Failed => "failed",
        }
    }

    /// Dense index in `0..ALL.len()`.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The result of [`sync_all`]: who flushed, who did not and why.
#[derive(Debug, Default)]
pub struct SyncSummary {
    /// Writer ids of the receivers that flushed.
    pub synced: Vec<String>,
    /// Receivers that did not confirm, with the reason.
    pub failed: Vec<(String, ControlError)>,
}

impl SyncSummary {
    /// The summary in one word.
    pub fn outcome(&self) -> SyncOutcome {
        if !self.failed.is_empty() {
            SyncOutcome::Failed
        } else if self.synced.is_empty() {
            SyncOutcome::None
        } else {
            SyncOutcome::Ok
        }
    }
}

/// Asks every running receiver of `data` to drain and flush, and waits for every answer (each
/// bounded by `timeout`). Once it returns with [`SyncOutcome::Ok`], everything that reached
/// any receiver's sockets before the call is in the store. An error means the receivers could
/// not be listed.
pub fn sync_all(data: &DataDir, timeout: Duration) -> io::Result<SyncSummary> {
    let mut summary = SyncSummary::default();
    for answer in request_all(data, Command::Sync, timeout)? {
        match answer.result {
            Ok(_) => summary.synced.push(answer.writer_id),
            Err(e) => summary.failed.push((answer.writer_id, e)),
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_back_as_written() {
        let cases = [
            (
                Command::Ping,
                Reply::Pong(Pong {
                    writer_id: "host-1".into(),
                    pid: 7,
                    version: "1.0.0".into(),
                }),
            ),
            (Command::Sync, Reply::Synced(Synced { epoch: 12 })),
            (
                Command::ResetBegin,
                Reply::ResetBegun(ResetBegun { dropped_pending: 3 }),
            ),
            (
                Command::ResetEnd,
                Reply::ResetEnded(ResetEnded { epoch: 4 }),
            ),
            (
                Command::Forget(AppSha([7; 32])),
                Reply::ForgetBegun(ForgetBegun { epoch: 9 }),
            ),
        ];
        for (command, reply) in cases {
            let line = reply.line();
            assert!(line.starts_with("ok {") && line.ends_with("}\n"), "{line}");
            assert_eq!(Reply::parse(command, &line).unwrap(), reply);
        }
    }

    #[test]
    fn refusals_are_one_line_and_read_back_as_errors() {
        let line = Reply::Refused("two\nlines".into()).line();
        assert_eq!(line, "err two lines\n");
        match Reply::parse(Command::Sync, &line) {
            Err(ControlError::Refused(message)) => assert_eq!(message, "two lines"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_and_silence_are_not_replies() {
        assert!(matches!(
            Reply::parse(Command::Sync, ""),
            Err(ControlError::Closed)
        ));
        assert!(matches!(
            Reply::parse(Command::Sync, "ok {\"nope\":1}\n"),
            Err(ControlError::Malformed(_))
        ));
        assert!(matches!(
            Reply::parse(Command::Ping, "yes\n"),
            Err(ControlError::Malformed(_))
        ));
    }

    #[test]
    fn every_command_parses_from_its_line() {
        for command in [
            Command::Ping,
            Command::Sync,
            Command::ResetBegin,
            Command::ResetEnd,
            Command::Forget(AppSha([0xab; 32])),
            Command::ForgetShipped(AppSha([0xcd; 32])),
        ] {
            let line = command.line();
            assert!(line.len() <= MAX_REQUEST_BYTES, "{line}");
            assert_eq!(Command::parse(line.trim_end()), Some(command));
        }
        assert_eq!(Command::parse("format-disk"), None);
        assert_eq!(Command::parse("forget 12ab"), None);
        assert_eq!(Command::parse("forget"), None);
    }
}
