//! `DELETE /events/{sha}`: forgets one app everywhere (`ipevent_core::forget`), with the
//! authorisation of `DELETE /events` and, for that app, its guarantee (contract 5): nothing
//! received before the request is reported after the answer, everything after it is.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};

use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ipevent_core::forget::ForgetError;
use ipevent_core::AppSha;

use crate::state::{error, internal_error, AppState};

/// `DELETE /events/{sha}`. 200 with `{"forgotten":SHA,"found":BOOL,"receivers":[...]}`
/// (`found`: the store held something of the app); 400 for a malformed SHA; 503 when a
/// receiver could not be held (nothing was removed: retry). With `--store`, the forget of the
/// bucket (`Bucket::forget`): 200 once every writer of the bucket applied it (the body adds
/// `stopped_writers`, `generation` and `sequence`), 503 naming the receivers that did not
/// within `--sync-timeout-ms` (the forget is recorded; they apply it when they next look).
pub async fn delete_app(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = state.admin.authorize(peer, &headers) {
        return denied.into_response();
    }
    let app: AppSha = match path {
        Ok(Path(sha)) => match sha.parse() {
            Ok(app) => app,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        },
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if let Some(bucket) = &state.bucket {
        return forget_in_bucket(Arc::clone(bucket), app, peer, state.control_timeout).await;
    }
    // Taken alone, as a reset takes it: no read or post sees the app half removed.
    let gate = state.gate.clone().write_owned().await;
    let data = state.data.clone();
    let posts = state.posts.clone();
    let timeout = state.control_timeout;
    let done = tokio::task::spawn_blocking(move || {
        let _gate = gate;
        let mut posts = posts.lock().unwrap_or_else(PoisonError::into_inner);
        let own = posts.writer_id().to_string();
        ipevent_core::forget::forget_app(&data, &app, timeout, Some(&own), || {
            posts
                .forget_app(&app)
                .map(|()| true)
                .map_err(|e| e.to_string())
        })
    })
    .await;
    match done {
        Ok(Ok(done)) => {
            log::info!(
                "app {app} forgotten by {peer} (found: {}), {} receiver(s) held",
                done.found,
                done.receivers.len()
            );
            let body = serde_json::json!({
                "forgotten": app.to_hex(),
                "found": done.found,
                "receivers": done.receivers,
            });
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        Ok(Err(e @ ForgetError::Receivers(_))) => {
            log::warn!("forget of {app} by {peer} failed: {e}");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Ok(Err(e @ ForgetError::Unsupported(_))) => {
            log::warn!("forget of {app} by {peer} refused: {e}");
            error(StatusCode::NOT_IMPLEMENTED, e.to_string())
        }
        Ok(Err(e @ ForgetError::Store(_))) => internal_error("forgetting an app", e),
        Err(e) => internal_error("forgetting an app", e),
    }
}

/// `DELETE /events/{sha}` with `--store`: every writer of the bucket forgets the app (the
/// receivers on this host's data dir, and this API's own writer, through their shippers).
async fn forget_in_bucket(
    bucket: Arc<ipevent_store_s3::Bucket>,
    app: AppSha,
    peer: SocketAddr,
    timeout: std::time::Duration,
) -> Response {
    let done = tokio::task::spawn_blocking(move || {
        let found = bucket.read_app(&app)?.is_some();
        bucket.forget(&app, timeout).map(|done| (found, done))
    })
    .await;
    match done {
        Ok(Ok((found, done))) if done.complete() => {
            log::info!(
                "app {app} forgotten in the bucket by {peer} (found: {found}), applied by {} \
                 receiver(s) and {} stopped writer(s)",
                done.answered.len(),
                done.stopped.len()
            );
            let body = done.answer(&app, found);
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        Ok(Ok((_, done))) => {
            let why = format!(
                "not confirmed: receivers {} did not apply the forget of app {app} within \
                 {timeout:?}, so their databases may still report it; it is recorded in the \
                 bucket and they apply it when they next run (retry to confirm)",
                done.missing.join(", ")
            );
            log::warn!("forget by {peer}: {why}");
            error(StatusCode::SERVICE_UNAVAILABLE, why)
        }
        Ok(Err(e)) => {
            log::warn!("forget of {app} by {peer} failed: {e}");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not forgotten: {e}"),
            )
        }
        Err(e) => internal_error("forgetting an app", e),
    }
}
