//! `ipevent-api`: the REST service over the ipevent store.
//!
//! A thin binary over `ipevent-core`: the report it serves is the one `ipevent-query` prints
//! (`store::read_app` and `Report`), the events it takes go through the same decoder as the
//! receiver's, and it talks to running receivers over their control sockets to read after
//! write (contract 4) and to reset (contract 5).

#![forbid(unsafe_code)]

mod admin;
mod app;
mod config;
mod forget;
mod listen;
mod metrics;
mod post;
mod reset;
mod serve;
mod state;
mod sync;
mod watch;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use clap::Parser;
use ipevent_core::DataDir;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::admin::AdminPolicy;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::post::PostWriter;
use crate::state::{AppState, Watches};
use crate::sync::Syncer;

/// Threads for blocking work (store reads, control calls, appends). Each request in flight
/// holds at most one; beyond this, requests queue instead of spawning more threads.
const MAX_BLOCKING_THREADS: usize = 64;

/// How long a stop waits for blocking work that outlived its request (a control call stuck
/// on an unresponsive receiver) before exiting anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    // Usage errors exit 2 (clap's convention); everything else that fails exits 1.
    let config = Config::parse();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,slatedb=warn"),
    )
    .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipevent-api: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    if let Some(token) = &config.admin_token {
        admin::validate_token(token).map_err(anyhow::Error::msg)?;
    }
    ipevent_core::privilege::check_root("ipevent-api", config.refuse_root)?;
    let data = DataDir::new(&config.data_dir);
    data.create()
        .with_context(|| format!("preparing the data dir {}", config.data_dir.display()))?;
    let writer_id = config.writer_id();
    // Held for the life of the process: no receiver or other API writes this writer's logs.
    let _lock = data.lock_writer(&writer_id)?;
    let mut posts = PostWriter::new(data.clone(), &writer_id)?;
    ipevent_core::store::trash::empty_trash(&data);
    if config.admin_token.is_none() && !config.allow_loopback_admin {
        log::warn!("no admin token and --allow-loopback-admin=false: DELETE /events is refused to everyone");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the async runtime")?;
    // Made outside the async runtime, and its last reference dropped outside it too: the
    // bucket has a runtime of its own, which may not be dropped inside another.
    let bucket = match &config.store {
        None => None,
        Some(url) => {
            let url: ipevent_store_s3::StoreUrl = url.parse()?;
            Some(Arc::new(ipevent_store_s3::Bucket::from_env(url)?))
        }
    };
    // With --store, POST /events reaches the bucket through the API's own outbox and shipper.
    let shipper = match &bucket {
        None => None,
        Some(bucket) => Some(start_shipping(
            &config, &data, &writer_id, bucket, &mut posts,
        )?),
    };
    let reader: Arc<dyn ipevent_core::store::Store + Send + Sync> = match &bucket {
        None => Arc::new(data.clone()),
        Some(bucket) => bucket.clone(),
    };
    let result = runtime.block_on(serve(
        config,
        data,
        writer_id,
        posts,
        reader,
        bucket.clone(),
    ));
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    if let Some(shipper) = shipper {
        shipper.stop();
    }
    result
}

/// Opens the API's outbox (`receivers/<writer-id>/outbox/`) for `POST /events` and starts its
/// shipper to the writer's own database in the bucket. The API does not wait for the bucket:
/// posts are queued on local disk until it answers.
fn start_shipping(
    config: &Config,
    data: &DataDir,
    writer_id: &str,
    bucket: &Arc<ipevent_store_s3::Bucket>,
    posts: &mut PostWriter,
) -> anyhow::Result<ipevent_store_s3::shipper::Shipper> {
    use ipevent_store_s3::shipper::{self, ShipCounters, Shipper, ShipperSettings};
    let counters = Arc::new(ShipCounters::default());
    // Each post's entry is synced before the 202; a full disk fails the post (500).
    let (outbox, woken) = shipper::Outbox::open(data, writer_id, true, 0, Arc::clone(&counters))?;
    posts.ship_through(outbox);
    let host = ipevent_core::store::host_writer_id("");
    let settings = ShipperSettings {
        bucket: Arc::clone(bucket),
        writer_id: writer_id.to_string(),
        instance: shipper::instance_token(data, writer_id)?,
        holder: format!("host {host}, data dir {}", config.data_dir.display()),
        outbox_dir: ipevent_store_s3::outbox::dir(data, writer_id),
        data: data.clone(),
        control_socket: None,
        interval: POST_SHIP_INTERVAL,
        counters,
        start_wait: Duration::ZERO,
    };
    Shipper::start(settings, woken).with_context(|| format!("shipping to {}", bucket.url()))
}

/// How often the API's shipper looks at the bucket (sync requests, resets) when no post woke
/// it: the receivers' default ship interval.
const POST_SHIP_INTERVAL: Duration = Duration::from_millis(1000);

async fn serve(
    config: Config,
    data: DataDir,
    writer_id: String,
    posts: PostWriter,
    reader: Arc<dyn ipevent_core::store::Store + Send + Sync>,
    bucket: Option<Arc<ipevent_store_s3::Bucket>>,
) -> anyhow::Result<()> {
    // Handlers first, so a signal that comes right after readiness is a clean stop.
    let mut sigterm = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("handling SIGINT")?;

    let metrics = Arc::new(Metrics::default());
    let conns = metrics.conns.clone();
    let syncer = {
        let metrics = metrics.clone();
        Syncer::new(
            data.clone(),
            bucket.clone(),
            config.sync_timeout(),
            move |outcome| metrics.sync_round(outcome),
        )
    };
    let limits = connection_limits(&config);
    let watches = Arc::new(Watches::new(watch_streams(&config, &limits)));
    let state = Arc::new(AppState {
        data: data.clone(),
        reader,
        bucket,
        syncer,
        metrics,
        gate: Arc::default(),
        posts: Arc::new(Mutex::new(posts)),
        admin: AdminPolicy::new(config.admin_token.clone(), config.allow_loopback_admin),
        control_timeout: config.sync_timeout(),
        watches: watches.clone(),
    });
    let app: Router = app::router(state, config.request_timeout());

    let listener = listen::bind(config.listen)?;
    let listener =
        tokio::net::TcpListener::from_std(listener).context("registering the listener")?;
    let bound = listener.local_addr().context("reading the bound address")?;
    announce(&config, bound, &writer_id)?;

    serve::serve(listener, app, limits, conns, async move {
        stop_signal(&mut sigterm, &mut sigint).await;
        // Streams end here, so the requests in flight can finish.
        watches.stop();
    })
    .await;
    log::info!("stopped");
    Ok(())
}

/// The connection limits: the flags, with the cap lowered to what the open-files limit
/// (raised to its hard limit first) leaves room for.
fn connection_limits(config: &Config) -> serve::Limits {
    let wanted = config.max_connections;
    let max_connections = match ipevent_core::sys::raise_open_files_limit() {
        Ok(open_files) => {
            let room = open_files.saturating_sub(serve::RESERVED_FDS).max(16);
            if room < wanted {
                log::warn!(
                    "the open-files limit is {open_files}: serving at most {room} connections \
                     instead of {wanted} (raise LimitNOFILE / ulimit -n for more)"
                );
            }
            wanted.min(room)
        }
        Err(e) => {
            log::warn!("reading the open-files limit: {e}; serving at most {wanted} connections");
            wanted
        }
    };
    serve::Limits {
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        header_timeout: Duration::from_millis(config.header_timeout_ms),
    }
}

/// The cap on watch streams: the flag, at most half the connections, so that streams never
/// keep ordinary requests out.
fn watch_streams(config: &Config, limits: &serve::Limits) -> usize {
    let wanted = usize::try_from(config.max_watch_streams).unwrap_or(usize::MAX);
    let room = limits.max_connections / 2;
    if wanted > room {
        log::warn!(
            "serving at most {room} watch streams (half the connection cap) instead of {wanted}"
        );
    }
    wanted.min(room)
}

/// Says where the API listens: on stderr, and in the ready file if one was asked for.
fn announce(config: &Config, bound: SocketAddr, writer_id: &str) -> anyhow::Result<()> {
    if let Some(path) = &config.ready_file {
        ipevent_core::store::write_atomic(path, format!("{bound}\n").as_bytes())
            .context("writing the ready file")?;
    }
    log::info!(
        "listening on {bound} (data dir {}, writer id {writer_id}, version {})",
        config.data_dir.display(),
        ipevent_core::VERSION
    );
    Ok(())
}

async fn stop_signal(sigterm: &mut Signal, sigint: &mut Signal) {
    let name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    log::info!("{name}: finishing the requests in flight, then stopping");
}
