//! `GET /watch[?since=TIME]`: the lines of `ipevent-query watch` as server-sent events, one
//! `data:` line each ([`ipevent_core::watch`]).
//!
//! A stream lasts as long as its client, so it has limits of its own: at most
//! `--max-watch-streams` at once (beyond: 503), each a [`Watcher`] polled on the blocking
//! pool for the moment of a poll only, a keep-alive comment every 15 s so that a client that
//! went away is noticed, and an end on shutdown so that a stop never waits for a stream. A
//! stream is one request in progress for the connection loop: the header timeout, which
//! runs only while a connection waits for a request, never cuts it, and shedding never
//! picks it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ipevent_core::store::{Store, StoreError};
use ipevent_core::watch::{self, Since, Watcher, POLL_INTERVAL};
use serde::Deserialize;
use tokio::sync::{watch as signal, OwnedSemaphorePermit};

use crate::state::{error, AppState};

/// `?since=`.
#[derive(Deserialize)]
pub struct WatchParams {
    since: Option<String>,
}

/// `GET /watch`.
pub async fn get_watch(
    State(state): State<Arc<AppState>>,
    params: Result<Query<WatchParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let since = match params {
        Ok(Query(WatchParams { since: None })) => Since::Now,
        Ok(Query(WatchParams { since: Some(text) })) => {
            match watch::parse_since(&text, SystemTime::now()) {
                Ok(since) => since,
                Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
            }
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let watches = &state.watches;
    let Ok(permit) = Arc::clone(&watches.slots).try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} watch streams are open, the most this API serves (--max-watch-streams); try again later",
                watches.max
            ),
        );
    };
    let reader = Arc::clone(&state.reader);
    let started = {
        let _gate = state.gate.read().await;
        let reader = Arc::clone(&reader);
        tokio::task::spawn_blocking(move || Watcher::start(reader.as_ref(), since)).await
    };
    let watcher = match started {
        Ok(Ok(watcher)) => watcher,
        Ok(Err(StoreError::Unsupported(why))) => return error(StatusCode::NOT_IMPLEMENTED, why),
        Ok(Err(e)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the store: {e}"),
            )
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the store: {e}"),
            )
        }
    };
    let stream = Stream {
        watcher: Some(watcher),
        reader,
        state: Arc::clone(&state),
        lines: VecDeque::new(),
        last_error: None,
        stop: watches.stop_rx.clone(),
        _permit: permit,
    };
    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let line = stream.next_line().await?;
        Some((Ok::<_, Infallible>(Event::default().data(line)), stream))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// One client's stream.
struct Stream {
    /// Taken while a poll runs on the blocking pool.
    watcher: Option<Watcher>,
    reader: Arc<dyn Store + Send + Sync>,
    state: Arc<AppState>,
    lines: VecDeque<String>,
    /// The last error following the store, logged once.
    last_error: Option<String>,
    stop: signal::Receiver<bool>,
    /// Its slot among `--max-watch-streams`, given back when the stream ends.
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    /// The next line, waiting for it as long as it takes; `None` at shutdown (or when the
    /// store can no longer be followed).
    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(line) = self.lines.pop_front() {
                return Some(line);
            }
            if *self.stop.borrow() {
                return None;
            }
            tokio::select! {
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = self.stop.changed() => return None,
            }
            let mut watcher = self.watcher.take()?;
            let reader = Arc::clone(&self.reader);
            let _gate = self.state.gate.read().await;
            let polled = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                let result = watcher.poll(reader.as_ref(), &mut out);
                (watcher, out, result)
            })
            .await;
            let Ok((watcher, out, result)) = polled else {
                return None;
            };
            self.watcher = Some(watcher);
            match result {
                Ok(()) => self.last_error = None,
                Err(e) => {
                    let message = e.to_string();
                    if self.last_error.as_ref() != Some(&message) {
                        log::warn!("watch: following the store: {message}; retrying");
                        self.last_error = Some(message);
                    }
                }
            }
            self.lines.extend(out.iter().map(|t| t.to_json()));
        }
    }
}
