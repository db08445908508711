//! Who may reset (`DELETE /events`): loopback peers when trusted, and anyone presenting the
//! admin token. Wrong tokens are limited per peer, and refusals are logged at most once per
//! interval per peer, so guessing the token is slow and cannot flood the log.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Shortest admin token the API starts with: 16 bytes, e.g. `openssl rand -hex 32` gives 64.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Wrong tokens a peer may present per [`FAILURE_WINDOW`]; beyond that its resets are
/// answered 429 until the window ends, whatever token they carry.
const MAX_FAILURES: u32 = 5;
/// The window over which wrong tokens are counted.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Refusals of one peer are logged at most once per this interval (with how many there were).
const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Peers remembered at once; beyond it the stalest record is forgotten, so a flood of
/// addresses cannot grow memory.
const MAX_TRACKED_PEERS: usize = 4096;

/// Checks a configured admin token; the message never repeats the token.
pub fn validate_token(token: &str) -> Result<(), String> {
    const HINT: &str = "generate one with `openssl rand -hex 32`";
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        Err(format!(
            "the admin token (--admin-token, IPEVENT_ADMIN_TOKEN) must be printable ASCII \
             without spaces; {HINT}"
        ))
    } else if token.len() < MIN_TOKEN_BYTES {
        Err(format!(
            "the admin token (--admin-token, IPEVENT_ADMIN_TOKEN) is {} bytes, under the \
             {MIN_TOKEN_BYTES} bytes it needs; {HINT}",
            token.len()
        ))
    } else {
        Ok(())
    }
}

/// Who may reset, and what each peer has tried.
pub struct AdminPolicy {
    token: Option<String>,
    allow_loopback: bool,
    peers: Mutex<Peers>,
}

/// Why a reset was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No credentials: 401 with `WWW-Authenticate: Bearer`.
    NoToken,
    /// Credentials that do not allow it: 403.
    Forbidden(&'static str),
    /// Too many wrong tokens from this peer lately: 429 with `Retry-After`.
    TooMany {
        /// When the peer may try again.
        retry_after: Duration,
    },
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::NoToken => f.write_str("no admin token presented"),
            Denied::Forbidden(why) => f.write_str(why),
            Denied::TooMany { retry_after } => write!(
                f,
                "too many wrong admin tokens from this address; retry in {} s",
                retry_secs(*retry_after)
            ),
        }
    }
}

fn retry_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, extra) = match self {
            Denied::NoToken => (
                StatusCode::UNAUTHORIZED,
                Some((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))),
            ),
            Denied::Forbidden(_) => (StatusCode::FORBIDDEN, None),
            Denied::TooMany { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                Some((
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_secs(retry_after)),
                )),
            ),
        };
        let message = match status {
            StatusCode::UNAUTHORIZED => "a reset needs Authorization: Bearer <admin token>".into(),
            _ => message,
        };
        let body = serde_json::json!({ "error": message }).to_string();
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some((name, value)) = extra {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

impl AdminPolicy {
    /// A policy allowing `token` from anywhere and, with `allow_loopback`, loopback peers
    /// without it.
    pub fn new(token: Option<String>, allow_loopback: bool) -> AdminPolicy {
        AdminPolicy {
            token,
            allow_loopback,
            peers: Mutex::new(Peers::default()),
        }
    }

    /// `Ok` when `peer` presenting `headers` may reset now. A refusal is logged here, at
    /// most once per [`LOG_INTERVAL`] per peer.
    pub fn authorize(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Denied> {
        let now = Instant::now();
        let ip = peer.ip().to_canonical();
        if self.allow_loopback && ip.is_loopback() {
            return Ok(());
        }
        let key = PeerKey::of(ip);
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let verdict = match peers.blocked_for(key, now) {
            Some(retry_after) => Err(Denied::TooMany { retry_after }),
            None => {
                let verdict = self.check_token(headers);
                if verdict == Err(Denied::Forbidden(WRONG_TOKEN)) {
                    peers.failed(key, now);
                }
                verdict
            }
        };
        if let Err(denied) = &verdict {
            if let Some(count) = peers.refused(key, now) {
                if count == 1 {
                    log::warn!(
                        "refused a reset from {peer}: {denied} (further refusals from this \
                         address are logged at most once a minute)"
                    );
                } else {
                    log::warn!(
                        "refused {count} resets from {ip} since the last message; the \
                         latest: {denied}"
                    );
                }
            }
        }
        verdict
    }

    fn check_token(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let Some(token) = &self.token else {
            return Err(Denied::Forbidden(
                "resets are only allowed from loopback (no admin token is configured)",
            ));
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            None => Err(Denied::NoToken),
            // Compared as presented: a token with spaces around it is another token.
            Some(presented) if constant_time_eq(presented.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(Denied::Forbidden(WRONG_TOKEN)),
        }
    }
}

const WRONG_TOKEN: &str = "wrong admin token";

/// Compares in a time that depends only on the length of `presented`, never on where it
/// differs from `expected` or on the length of `expected`.
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return false;
    }
    let mut diff = u8::from(presented.len() != expected.len());
    for (i, byte) in presented.iter().enumerate() {
        diff |= byte ^ expected[i % expected.len()];
    }
    diff == 0
}

/// What limits are keyed by: an IPv4 address, or an IPv6 /64 (one host's usual share, so
/// rotating through its addresses does not reset the count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PeerKey {
    V4(u32),
    V6Prefix(u64),
}

impl PeerKey {
    fn of(ip: IpAddr) -> PeerKey {
        match ip {
            IpAddr::V4(v4) => PeerKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => PeerKey::V6Prefix((u128::from(v6) >> 64) as u64),
        }
    }
}

#[derive(Debug)]
struct PeerRecord {
    /// Start of the current failure window.
    window_start: Instant,
    /// Wrong tokens in the current window.
    failures: u32,
    /// Refusals not yet logged.
    unlogged: u64,
    /// When a refusal of this peer was last logged.
    last_logged: Option<Instant>,
    /// Last time this record changed, for forgetting the stalest.
    touched: Instant,
}

#[derive(Default)]
struct Peers {
    records: HashMap<PeerKey, PeerRecord>,
}

impl Peers {
    /// How long `key` must still wait, when it has used up its wrong tokens.
    fn blocked_for(&self, key: PeerKey, now: Instant) -> Option<Duration> {
        let record = self.records.get(&key)?;
        let ends = record.window_start + FAILURE_WINDOW;
        (record.failures >= MAX_FAILURES && now < ends).then(|| ends - now)
    }

    /// Counts a wrong token from `key`.
    fn failed(&mut self, key: PeerKey, now: Instant) {
        let record = self.record(key, now);
        if now >= record.window_start + FAILURE_WINDOW {
            record.window_start = now;
            record.failures = 0;
        }
        record.failures += 1;
    }

    /// Counts a refusal of `key`; `Some(n)` when it is time to log the `n` refusals since
    /// the last message.
    fn refused(&mut self, key: PeerKey, now: Instant) -> Option<u64> {
        let record = self.record(key, now);
        record.unlogged += 1;
        let due = record
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= LOG_INTERVAL);
        due.then(|| {
            record.last_logged = Some(now);
            std::mem::take(&mut record.unlogged)
        })
    }

    fn record(&mut self, key: PeerKey, now: Instant) -> &mut PeerRecord {
        if !self.records.contains_key(&key) && self.records.len() >= MAX_TRACKED_PEERS {
            self.forget_stale(now);
        }
        let record = self.records.entry(key).or_insert(PeerRecord {
            window_start: now,
            failures: 0,
            unlogged: 0,
            last_logged: None,
            touched: now,
        });
        record.touched = now;
        record
    }

    /// Forgets every record that no longer limits or holds back a log message, or else the
    /// one left alone longest.
    fn forget_stale(&mut self, now: Instant) {
        let keep = FAILURE_WINDOW.max(LOG_INTERVAL);
        self.records
            .retain(|_, r| now.duration_since(r.touched) < keep);
        if self.records.len() >= MAX_TRACKED_PEERS {
            if let Some(stalest) = self
                .records
                .iter()
                .min_by_key(|(_, r)| r.touched)
                .map(|(k, _)| *k)
            {
                self.records.remove(&stalest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    fn status(r: Result<(), Denied>) -> Option<StatusCode> {
        r.err().map(|d| d.into_response().status())
    }

    const TOKEN: &str = "0123456789abcdef";

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secretsecret", b"secret"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b" secret", b"secret"));
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused_without_repeating_them() {
        assert_eq!(validate_token(TOKEN), Ok(()));
        for bad in [
            "",
            "fifteen-bytes!!",
            "has a space in it ok",
            "tab\tin-it-long-enough",
        ] {
            let message = validate_token(bad).unwrap_err();
            assert!(message.contains("openssl rand -hex 32"), "{message}");
            assert!(bad.is_empty() || !message.contains(bad), "{message}");
        }
        assert!(validate_token("fifteen-bytes!!")
            .unwrap_err()
            .contains("is 15 bytes"));
    }

    #[test]
    fn admin_policy() {
        let loopback: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:1".parse().unwrap();
        let open = AdminPolicy::new(None, true);
        assert_eq!(status(open.authorize(loopback, &HeaderMap::new())), None);
        assert_eq!(status(open.authorize(mapped, &HeaderMap::new())), None);
        assert_eq!(
            status(open.authorize(remote, &bearer("x"))),
            Some(StatusCode::FORBIDDEN)
        );
        let token = AdminPolicy::new(Some(TOKEN.into()), false);
        assert_eq!(
            status(token.authorize(loopback, &HeaderMap::new())),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            status(token.authorize(remote, &bearer("nope"))),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(status(token.authorize(remote, &bearer(TOKEN))), None);
        // Not trimmed: spaces make it another token.
        assert_eq!(
            status(token.authorize(remote, &bearer(&format!(" {TOKEN}")))),
            Some(StatusCode::FORBIDDEN)
        );
        let both = AdminPolicy::new(Some(TOKEN.into()), true);
        assert_eq!(
            status(both.authorize(remote, &HeaderMap::new())),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(status(both.authorize(loopback, &HeaderMap::new())), None);
    }

    #[test]
    fn wrong_tokens_are_limited_per_peer() {
        let policy = AdminPolicy::new(Some(TOKEN.into()), false);
        let guesser: SocketAddr = "192.0.2.7:1".parse().unwrap();
        let same_host: SocketAddr = "192.0.2.7:2".parse().unwrap();
        let other: SocketAddr = "192.0.2.8:1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert_eq!(
                status(policy.authorize(guesser, &bearer("guess"))),
                Some(StatusCode::FORBIDDEN)
            );
        }
        // Used up: even the right token waits, from any port of that address.
        let denied = policy.authorize(same_host, &bearer(TOKEN)).unwrap_err();
        let Denied::TooMany { retry_after } = denied else {
            panic!("{denied:?}")
        };
        assert!(retry_after <= FAILURE_WINDOW);
        let response = Denied::TooMany { retry_after }.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        // Another peer is not affected.
        assert_eq!(status(policy.authorize(other, &bearer(TOKEN))), None);
    }

    #[test]
    fn windows_end_and_logs_are_spaced() {
        let mut peers = Peers::default();
        let key = PeerKey::of("2001:db8::1".parse().unwrap());
        assert_eq!(key, PeerKey::of("2001:db8::ffff".parse().unwrap()));
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            peers.failed(key, t0);
        }
        assert_eq!(peers.blocked_for(key, t0), Some(FAILURE_WINDOW));
        assert_eq!(peers.blocked_for(key, t0 + FAILURE_WINDOW), None);
        peers.failed(key, t0 + FAILURE_WINDOW);
        assert_eq!(peers.blocked_for(key, t0 + FAILURE_WINDOW), None);

        assert_eq!(peers.refused(key, t0), Some(1));
        assert_eq!(peers.refused(key, t0 + Duration::from_secs(1)), None);
        assert_eq!(peers.refused(key, t0 + Duration::from_secs(2)), None);
        assert_eq!(peers.refused(key, t0 + LOG_INTERVAL), Some(3));
    }

    #[test]
    fn memory_is_bounded_whatever_the_number_of_peers() {
        let mut peers = Peers::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED_PEERS as u32 * 3) {
            peers.failed(PeerKey::V4(i), t0);
        }
        assert!(peers.records.len() <= MAX_TRACKED_PEERS);
    }
}
