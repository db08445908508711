//! What every handler shares ([`AppState`]), the open `GET /watch` streams ([`Watches`]) and
//! the JSON error replies.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use ipevent_core::store::Store;
use ipevent_core::DataDir;
use tokio::sync::{watch as signal, RwLock, Semaphore};

use crate::admin::AdminPolicy;
use crate::metrics::Metrics;
use crate::post::PostWriter;
use crate::sync::Syncer;

/// What every handler shares.
pub struct AppState {
    /// The store.
    pub data: DataDir,
    /// Where reports are read: the data dir, or the bucket of `--store`.
    pub reader: Arc<dyn Store + Send + Sync>,
    /// With `--store`: the bucket, which a reset resets for every receiver that ships there.
    pub bucket: Option<Arc<ipevent_store_s3::Bucket>>,
    /// Syncs with the receivers before reads.
    pub syncer: Syncer,
    /// The API's counters.
    pub metrics: Arc<Metrics>,
    /// Reads and posts share it; a reset takes it alone, so that nothing reads or writes
    /// the tree while it moves.
    pub gate: Arc<RwLock<()>>,
    /// The API's own store writer.
    pub posts: Arc<Mutex<PostWriter>>,
    /// Who may reset.
    pub admin: AdminPolicy,
    /// Per-receiver timeout for control requests.
    pub control_timeout: Duration,
    /// The open `GET /watch` streams.
    pub watches: Arc<Watches>,
}

/// The open watch streams, and what ends them.
pub struct Watches {
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) max: usize,
    stop_tx: signal::Sender<bool>,
    pub(crate) stop_rx: signal::Receiver<bool>,
}

impl Watches {
    /// At most `max` streams at once.
    pub fn new(max: usize) -> Watches {
        let (stop_tx, stop_rx) = signal::channel(false);
        Watches {
            slots: Arc::new(Semaphore::new(max)),
            max,
            stop_tx,
            stop_rx,
        }
    }

    /// Ends every stream (at shutdown), and refuses new ones.
    pub fn stop(&self) {
        let _ = self.stop_tx.send(true);
        self.slots.close();
    }
}

/// A JSON error body `{"error":"..."}` with `status`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) fn internal_error(what: &str, e: impl std::fmt::Display) -> Response {
    log::error!("{what}: {e}");
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}"))
}
