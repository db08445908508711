//! The routes and their handlers.
//!
//! Every store read, control call and store write blocks, so each runs on the blocking pool
//! (`spawn_blocking`); the async workers only parse, negotiate and wait.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ipevent_core::lookup;
use ipevent_core::report::{report_json, JsonView};
use ipevent_core::stats::ReceiverStats;
use ipevent_core::store::{self, Store, StoreError};
use ipevent_core::wire::{self, AppSha, Reject, MAX_DATAGRAM_BYTES};
use ipevent_core::DataDir;
use serde::Deserialize;
use tower_http::timeout::TimeoutLayer;

use crate::metrics::UNMATCHED_ROUTE;
use crate::reset::{self, ResetError};
use crate::state::{error, internal_error, AppState};

/// Response header saying whether the receivers flushed before the read: `ok`, `none` (no
/// receiver running: the store on disk was served) or `failed` (a receiver did not answer).
pub static SYNC_HEADER: HeaderName = HeaderName::from_static("x-ipevent-sync");

/// Content types `POST /events` takes: the contract's, and the usual protobuf ones.
const PROTOBUF_CONTENT_TYPES: [&str; 3] = [
    "application/octet-stream",
    "application/x-protobuf",
    "application/protobuf",
];

/// Routes, as metrics label them.
const ROUTES: [&str; 5] = ["/", "/healthz", "/metrics", "/events", "/events/{sha}"];

type Shared = Arc<AppState>;

/// The application: every route, the request timeout and the request metrics.
pub fn router(state: Shared, request_timeout: Duration) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(
            "/events",
            axum::routing::post(post_event)
                .delete(delete_events)
                .layer(DefaultBodyLimit::max(MAX_DATAGRAM_BYTES)),
        )
        .route(
            "/events/{sha}",
            get(get_events).delete(crate::forget::delete_app),
        )
        .route("/ips/{addr}", get(get_ips))
        .route("/ips/{addr}/{prefix}", get(get_ips))
        .route("/watch", get(crate::watch::get_watch))
        .fallback(not_found)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts every answered request by route, method and status, with its latency.
async fn track(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|path| ROUTES.iter().find(|r| **r == path.as_str()))
        .copied()
        .unwrap_or(UNMATCHED_ROUTE);
    let method = method_label(request.method());
    let response = next.run(request).await;
    state
        .metrics
        .request(route, method, response.status().as_u16(), start.elapsed());
    response
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

/// `GET /`: name and version.
async fn root() -> Response {
    let body = serde_json::json!({ "name": "ipevent-api", "version": ipevent_core::VERSION });
    json_response(body.to_string())
}

/// `GET /healthz`: `ok` when the store can be read.
async fn healthz(State(state): State<Shared>) -> Response {
    let data = state.data.clone();
    let checked = tokio::task::spawn_blocking(move || -> Result<(), String> {
        data.check_layout().map_err(|e| e.to_string())?;
        let events = data.events_dir();
        match store::for_each_entry(&events, |_| Ok(())) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "data dir unreadable: listing {}: {}",
                events.display(),
                std::io::Error::from_raw_os_error(libc::ENOENT)
            )),
            Err(e) => Err(format!("data dir unreadable: {e}")),
        }
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    match checked {
        Ok(()) => (StatusCode::OK, text, "ok\n".to_string()).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, text, format!("{e}\n")).into_response(),
    }
}

/// `GET /metrics`: the receivers' stats files and the API's counters.
async fn metrics(State(state): State<Shared>) -> Response {
    let data = state.data.clone();
    let receivers = tokio::task::spawn_blocking(move || read_receiver_stats(&data))
        .await
        .unwrap_or_default();
    let body = state.metrics.render(&receivers, ipevent_core::VERSION);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Every receiver's last stats snapshot; one unreadable file is logged and left out rather
/// than hiding the others.
fn read_receiver_stats(data: &DataDir) -> Vec<ReceiverStats> {
    let all = match ReceiverStats::read_all(data) {
        Ok(all) => all,
        Err(e) => {
            log::warn!("metrics: {e}");
            return Vec::new();
        }
    };
    all.into_iter()
        .filter_map(|(id, result)| match result {
            Ok(stats) => Some(stats),
            Err(e) => {
                log::warn!("metrics: reading {}: {e}", data.stats_path(&id).display());
                None
            }
        })
        .collect()
}

/// Query string of `GET /events/{sha}`.
#[derive(Deserialize)]
struct ReportQuery {
    /// `1` for the detailed view.
    detail: Option<String>,
}

/// `GET /events/{sha}`: the report, after the receivers flushed.
async fn get_events(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReportQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if !accepts_json(&headers) {
        return error(
            StatusCode::NOT_ACCEPTABLE,
            "the report is only available as application/json",
        );
    }
    let app: AppSha = match path {
        Ok(Path(sha)) => match sha.parse() {
            Ok(app) => app,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        },
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let detail = match query {
        Ok(Query(q)) => match q.detail.as_deref() {
            None | Some("0") | Some("false") => false,
            Some("1") | Some("true") => true,
            Some(other) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("detail is 0 or 1, not {other:?}"),
                )
            }
        },
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };

    let reader = Arc::clone(&state.reader);
    synced_read(
        &state,
        move || read_report(&*reader, &app, detail),
        |report| match report {
            Some(json) => json_response(json),
            None => error(StatusCode::NOT_FOUND, format!("unknown app {app}")),
        },
    )
    .await
}

/// `GET /ips/{addr}` and `GET /ips/{net}/{prefix}`: the apps that talked to the address or
/// block, after the receivers flushed (`lookup::apps_by_address`).
async fn get_ips(
    State(state): State<Shared>,
    path: Result<Path<std::collections::HashMap<String, String>>, PathRejection>,
) -> Response {
    let text = match path {
        Ok(Path(parts)) => match (parts.get("addr"), parts.get("prefix")) {
            (Some(addr), Some(prefix)) => format!("{addr}/{prefix}"),
            (Some(addr), None) => addr.clone(),
            _ => return error(StatusCode::BAD_REQUEST, "no address in the path"),
        },
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let cidr: lookup::Cidr = match text.parse() {
        Ok(cidr) => cidr,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    let data = state.data.clone();
    synced_read(
        &state,
        move || lookup::apps_by_address(&data, cidr),
        |found| {
            json_response(serde_json::to_string(&found.report).expect("address reports serialise"))
        },
    )
    .await
}

/// A read after the receivers flushed: holds the gate until `read` is done (on the blocking
/// pool), so that a reset never moves the tree under it, answers with `respond` to what it
/// read, and says in [`SYNC_HEADER`] how the sync went; never cached.
async fn synced_read<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    state: &AppState,
    read: impl FnOnce() -> Result<T, E> + Send + 'static,
    respond: impl FnOnce(T) -> Response,
) -> Response {
    let _gate = state.gate.read().await;
    let synced = state.syncer.sync().await;
    let mut response = match tokio::task::spawn_blocking(read).await {
        Ok(Ok(found)) => respond(found),
        Ok(Err(e)) => internal_error("reading the store", e),
        Err(e) => internal_error("reading the store", e),
    };
    let headers = response.headers_mut();
    headers.insert(&SYNC_HEADER, HeaderValue::from_static(synced.name()));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A 200 with the JSON `body`.
fn json_response(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The report JSON of `app`, `None` for an app the store has never seen.
fn read_report(
    store: &(dyn Store + Send + Sync),
    app: &AppSha,
    detail: bool,
) -> Result<Option<String>, StoreError> {
    let view = JsonView {
        detail,
        pretty: false,
    };
    let Some(report) = report_json(store, app, view)? else {
        return Ok(None);
    };
    for (_, why) in &report.unreadable {
        log::debug!("{why}; not counted");
    }
    // Not a warning: reads are frequent, and the log's writer warns once when it repairs it.
    for (path, offset) in &report.torn {
        log::debug!(
            "{}: ignoring the tail after byte {offset}, which does not verify",
            path.display()
        );
    }
    Ok(Some(report.json))
}

/// True when the `Accept` headers allow `application/json` (no header allows anything).
fn accepts_json(headers: &HeaderMap) -> bool {
    let mut any = false;
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for range in value.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if media.is_empty() {
                continue;
            }
            any = true;
            let refused = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .or_else(|| p.strip_prefix("Q="))
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if !refused && matches!(media.as_str(), "application/json" | "application/*" | "*/*") {
                return true;
            }
        }
    }
    !any
}

/// `POST /events`: one protobuf `IpEvent`, stored durably before the 202.
async fn post_event(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !is_protobuf(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "POST /events takes one protobuf IpEvent as application/octet-stream",
        );
    }
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            state.metrics.post_rejected(Reject::Oversize);
            return error(StatusCode::PAYLOAD_TOO_LARGE, Reject::Oversize.name());
        }
        Err(e) => return error(e.status(), e.body_text()),
    };
    let event = match wire::decode(&body) {
        Ok(event) => event,
        Err(reason) => {
            state.metrics.post_rejected(reason);
            return error(StatusCode::BAD_REQUEST, reason.name());
        }
    };
    let gate = state.gate.clone().read_owned().await;
    let posts = state.posts.clone();
    let metrics = state.metrics.clone();
    let stored = tokio::task::spawn_blocking(move || {
        // The gate moves here so that a request cancelled by its timeout still keeps a reset
        // out until the append is over, and the count lands on the right side of a reset.
        let _gate = gate;
        let mut posts = posts.lock().unwrap_or_else(PoisonError::into_inner);
        let result = posts.append(&event, now_unix_secs());
        match &result {
            Ok(()) => metrics.post_accepted(),
            Err(_) => metrics.post_store_error(),
        }
        result
    })
    .await;
    match stored {
        Ok(Ok(())) => StatusCode::ACCEPTED.into_response(),
        Ok(Err(e)) => internal_error("storing the event", e),
        Err(e) => internal_error("storing the event", e),
    }
}

fn is_protobuf(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|media| PROTOBUF_CONTENT_TYPES.contains(&media.as_str()))
}

fn now_unix_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// `DELETE /events`: resets all data and counters (contract 5).
async fn delete_events(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = state.admin.authorize(peer, &headers) {
        return denied.into_response();
    }
    let gate = state.gate.clone().write_owned().await;
    let data = state.data.clone();
    let posts = state.posts.clone();
    let metrics = state.metrics.clone();
    let timeout = state.control_timeout;
    let bucket = state.bucket.clone();
    let done = tokio::task::spawn_blocking(move || {
        // Owned by the task, so a cancelled request cannot let reads or posts in mid-reset.
        let _gate = gate;
        // The cluster first: a new generation in the bucket, followed by every receiver that
        // ships there (each drops what it held and resets its own host's tree); then this
        // host's tree, as without --store.
        let cluster = match &bucket {
            Some(bucket) => match bucket.reset(timeout) {
                Ok(cluster) => Some(cluster),
                Err(e) => {
                    metrics.reset(false);
                    return Err(ResetError::Store(format!(
                        "resetting {}: {e}",
                        bucket.url()
                    )));
                }
            },
            None => None,
        };
        let mut posts = posts.lock().unwrap_or_else(PoisonError::into_inner);
        let result = reset::reset(&data, &mut posts, timeout).map(|done| (done, cluster));
        metrics.reset(result.is_ok());
        result
    })
    .await;
    match done {
        Ok(Ok((done, cluster))) => {
            log::info!(
                "reset by {peer}: store emptied, {} receiver(s) held",
                done.receivers.len()
            );
            let mut body = serde_json::json!({ "reset": true, "receivers": done.receivers });
            if let Some(cluster) = cluster {
                if !cluster.not_following.is_empty() {
                    log::warn!(
                        "reset by {peer}: receivers {} have not followed generation {} yet; \
                         they drop what they hold when they do",
                        cluster.not_following.join(", "),
                        cluster.generation
                    );
                }
                body["generation"] = cluster.generation.into();
                body["following"] = cluster.following.into();
                body["not_following"] = cluster.not_following.into();
            }
            json_response(body.to_string())
        }
        Ok(Err(e @ ResetError::Receivers(_))) => {
            log::warn!("reset by {peer} failed: {e}");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Ok(Err(e @ ResetError::Store(_))) => internal_error("resetting the store", e),
        Err(e) => internal_error("resetting the store", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(values: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        accepts_json(&headers)
    }

    #[test]
    fn accept_negotiation() {
        assert!(accept(&[]));
        assert!(accept(&[""]));
        assert!(accept(&["application/json"]));
        assert!(accept(&["*/*"]));
        assert!(accept(&["Application/JSON; charset=utf-8"]));
        assert!(accept(&["text/html, application/*;q=0.5"]));
        assert!(accept(&["text/html", "*/*;q=0.1"]));
        assert!(!accept(&["text/html"]));
        assert!(!accept(&["application/json;q=0"]));
        assert!(!accept(&["text/plain, application/xml"]));
    }
}
