//! The HTTP connection loop, built so that slow or idle clients cannot take the service down.
//!
//! - Every connection must deliver a complete request head within the header timeout of
//!   opening, or of its previous answer: a header-read timeout that is also the idle limit
//!   of kept-alive connections (hyper's `header_read_timeout`, which runs from the moment the
//!   connection waits for a request).
//! - At most `max_connections` are open. A new connection beyond that sheds the connection
//!   that has waited longest for a request (the slowest or idlest); connections with a
//!   request in progress are never shed. When every open connection is busy, the new one is
//!   closed at once.
//! - When the process runs out of file descriptors, accepting sheds the same way instead of
//!   spinning.
//!
//! So a flood of trickling or idle clients keeps turning over among themselves while a new,
//! short request (a health check, a read) is accepted, served and answered.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tower::ServiceExt as _;

/// Pause before accepting again after a failure that shedding could not relieve.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// File descriptors kept free for the store, control sockets and the blocking pool when the
/// connection cap is derived from the open-files limit.
pub const RESERVED_FDS: u64 = 256;

/// How connections are limited.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time a connection has for a complete request head, from opening or from its
    /// previous answer.
    pub header_timeout: Duration,
}

/// Counters of the connection loop, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnCounters {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed to make room for a new one.
    pub shed: AtomicU64,
    /// New connections closed at once because every open one was busy.
    pub refused: AtomicU64,
    /// Accept failures for lack of file descriptors.
    pub fd_exhausted: AtomicU64,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the requests in flight
/// finish (idle connections close at once) and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    counters: Arc<ConnCounters>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let registry = Arc::new(Registry::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    // Each connection task holds a sender; when all are gone, `recv` returns `None`.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                if is_fd_exhaustion(&e) {
                    counters.fd_exhausted.fetch_add(1, Ordering::Relaxed);
                    if registry.shed_longest_waiting() {
                        counters.shed.fetch_add(1, Ordering::Relaxed);
                        // The shed connection's task closes its socket; give it the turn.
                        tokio::task::yield_now().await;
                        continue;
                    }
                }
                log_accept_error(&e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        if registry.len() >= limits.max_connections {
            if registry.shed_longest_waiting() {
                counters.shed.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            }
        }
        let (id, shed) = registry.open();
        tokio::spawn(connection(
            stream,
            peer,
            id,
            shed,
            ConnContext {
                router: router.clone(),
                registry: registry.clone(),
                header_timeout: limits.header_timeout,
                stop: stop_rx.clone(),
                _done: done_tx.clone(),
            },
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_tx);
    let _ = done_rx.recv().await;
}

/// What a connection task shares with the loop.
struct ConnContext {
    router: Router,
    registry: Arc<Registry>,
    header_timeout: Duration,
    stop: watch::Receiver<bool>,
    /// Dropped when the task ends.
    _done: mpsc::Sender<()>,
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    shed: Arc<Notify>,
    mut ctx: ConnContext,
) {
    let _ = stream.set_nodelay(true);
    let service = {
        let router = ctx.router.clone();
        let registry = ctx.registry.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            registry.busy(id);
            let (router, registry) = (router.clone(), registry.clone());
            async move {
                let response = router.oneshot(request).await;
                registry.waiting(id);
                response
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut stopping = *ctx.stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    log::debug!("connection from {peer}: {e}");
                }
                break;
            }
            () = shed.notified() => {
                log::debug!("connection from {peer}: shed to make room");
                break;
            }
            changed = ctx.stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
    ctx.registry.close(id);
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// Logs an accept failure, at most once a second (a flood could otherwise fill the log).
fn log_accept_error(e: &std::io::Error) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    if last.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
        *last = Some(now);
        log::warn!("accepting a connection: {e}");
    }
}

/// The open connections: which are waiting for a request, and since when.
#[derive(Default)]
struct Registry {
    inner: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    open: HashMap<u64, Conn>,
    /// `(waiting since, id)` of every connection waiting for a request, oldest first.
    waiting: BTreeSet<(Instant, u64)>,
}

struct Conn {
    /// `Some` while waiting for a request; `None` while one is being answered.
    waiting_since: Option<Instant>,
    shed: Arc<Notify>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// A new connection, waiting for its first request.
    fn open(&self) -> (u64, Arc<Notify>) {
        let mut conns = self.lock();
        let id = conns.next_id;
        conns.next_id += 1;
        let now = Instant::now();
        let shed = Arc::new(Notify::new());
        conns.open.insert(
            id,
            Conn {
                waiting_since: Some(now),
                shed: shed.clone(),
            },
        );
        conns.waiting.insert((now, id));
        (id, shed)
    }

    /// Connection `id` received a request.
    fn busy(&self, id: u64) {
        let mut conns = self.lock();
        let Conns { open, waiting, .. } = &mut *conns;
        if let Some(since) = open.get_mut(&id).and_then(|c| c.waiting_since.take()) {
            waiting.remove(&(since, id));
        }
    }

    /// Connection `id` answered and waits for its next request.
    fn waiting(&self, id: u64) {
        let mut conns = self.lock();
        let now = Instant::now();
        let Conns { open, waiting, .. } = &mut *conns;
        if let Some(conn) = open.get_mut(&id) {
            if let Some(since) = conn.waiting_since.replace(now) {
                waiting.remove(&(since, id));
            }
            waiting.insert((now, id));
        }
    }

    /// Connection `id` is gone.
    fn close(&self, id: u64) {
        let mut conns = self.lock();
        if let Some(conn) = conns.open.remove(&id) {
            if let Some(since) = conn.waiting_since {
                conns.waiting.remove(&(since, id));
            }
        }
    }

    /// Tells the connection that has waited longest for a request to close; false when every
    /// open connection is busy answering one (or already closing).
    fn shed_longest_waiting(&self) -> bool {
        let mut conns = self.lock();
        let Some((since, id)) = conns.waiting.pop_first() else {
            return false;
        };
        // It stays counted until its task has closed the socket, so the cap bounds open
        // descriptors too.
        if let Some(conn) = conns.open.get_mut(&id) {
            debug_assert_eq!(conn.waiting_since, Some(since));
            conn.waiting_since = None;
            conn.shed.notify_one();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_waiting_connection_is_shed_first_and_busy_ones_never() {
        let registry = Registry::default();
        let (a, shed_a) = registry.open();
        let (b, _) = registry.open();
        let (c, shed_c) = registry.open();
        registry.busy(a);
        registry.busy(b);
        // a answered and waits again: now the newest waiter; c has waited longer.
        registry.waiting(a);
        assert!(registry.shed_longest_waiting());
        // Counted until its task closes it.
        assert_eq!(registry.len(), 3);
        // c's task is told to close; a is next, b (busy) never.
        let waker = futures_task_noop();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(std::pin::pin!(shed_c.notified()).poll(&mut cx).is_ready());
        assert!(registry.shed_longest_waiting());
        assert!(std::pin::pin!(shed_a.notified()).poll(&mut cx).is_ready());
        assert!(!registry.shed_longest_waiting());
        registry.close(a);
        registry.close(c);
        assert_eq!(registry.len(), 1);
        registry.close(b);
        assert_eq!(registry.len(), 0);
    }

    fn futures_task_noop() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }

    use std::future::Future as _;
}
