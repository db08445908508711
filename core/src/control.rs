//! The control channel: a Unix socket per running receiver, through which other tools ask it
//! to drain its sockets and flush (read-after-write, contract 4) or to reset (contract 5).
//!
//! The protocol is one request line and one reply line per connection:
//!
//! ```text
//! request:  ping | sync | reset-begin | reset-end
//! reply:    ok <json>   |   err <message>
//! ```
//!
//! `sync` answers once everything that reached the receiver's sockets before the request is in
//! the store. `reset-begin` drains, discards what is pending, zeroes the counters and holds
//! flushes until `reset-end` (or a timeout), so the caller can move the tree away while no
//! writer appends to it.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::store::DataDir;

/// Longest request line a receiver reads.
pub const MAX_REQUEST_BYTES: usize = 64;

/// A request to a receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Is it alive; who is it.
    Ping,
    /// Drain the sockets and flush everything received.
    Sync,
    /// Drain, drop everything pending, zero the counters, hold flushes.
    ResetBegin,
    /// Resume flushing after a reset.
    ResetEnd,
}

impl Command {
    /// The request word.
    pub fn word(self) -> &'static str {
        match self {
            Command::Ping => "ping",
            Command::Sync => "sync",
            Command::ResetBegin => "reset-begin",
            Command::ResetEnd => "reset-end",
        }
    }

    /// Parses a request line (without its newline).
    pub fn parse(line: &str) -> Option<Command> {
        [
            Command::Ping,
            Command::Sync,
            Command::ResetBegin,
            Command::ResetEnd,
        ]
        .into_iter()
        .find(|c| c.word() == line.trim())
    }
}

/// Why a request got no `ok`.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No receiver listens on that socket (no file, or nobody accepting).
    #[error("no receiver is running there")]
    NotRunning,
    /// The receiver did not answer in time.
    #[error("the receiver did not answer within {0:?}")]
    Timeout(Duration),
    /// The receiver answered with an error.
    #[error("the receiver refused: {0}")]
    Refused(String),
    /// Any other failure talking to it.
    #[error("talking to the receiver: {0}")]
    Io(#[from] io::Error),
}

/// Sends `command` to the receiver listening at `socket` and returns the JSON of its `ok`.
pub fn request(socket: &Path, command: Command, timeout: Duration) -> Result<String, ControlError> {
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
    (&stream).write_all(format!("{}\n", command.word()).as_bytes())?;
    let mut line = String::new();
    match BufReader::new(&stream).read_line(&mut line) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(ControlError::Timeout(timeout));
        }
        Err(e) => return Err(e.into()),
    }
    let line = line.trim_end();
    if let Some(body) = line.strip_prefix("ok ") {
        Ok(body.to_string())
    } else if let Some(message) = line.strip_prefix("err ") {
        Err(ControlError::Refused(message.to_string()))
    } else {
        Err(ControlError::Refused(format!("unexpected reply {line:?}")))
    }
}

/// The answer of one receiver to [`request_all`].
#[derive(Debug)]
pub struct Answer {
    /// The receiver's writer id.
    pub writer_id: String,
    /// Its reply.
    pub result: Result<String, ControlError>,
}

/// Sends `command` to every receiver that has a control socket in `data` and returns the
/// answers of those that are running (stale sockets of stopped receivers are left out).
pub fn request_all(data: &DataDir, command: Command, timeout: Duration) -> io::Result<Vec<Answer>> {
    let ids = data.writer_ids().map_err(io::Error::other)?;
    Ok(ids
        .into_iter()
        .filter_map(|writer_id| {
            let result = request(&data.control_socket(&writer_id), command, timeout);
            match result {
                Err(ControlError::NotRunning) => None,
                result => Some(Answer { writer_id, result }),
            }
        })
        .collect())
}
