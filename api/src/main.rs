//! `ipevent-api`: the REST service over the ipevent store.
//!
//! A thin binary over `ipevent-core`: the report it serves is the one `ipevent-query` prints
//! (`store::read_app` and `Report`), the events it takes go through the same decoder as the
//! receiver's, and it talks to running receivers over their control sockets to read after
//! write (contract 4) and to reset (contract 5).

#![forbid(unsafe_code)]

mod app;
mod config;
mod listen;
mod metrics;
mod reset;
mod sync;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use clap::Parser;
use ipevent_core::DataDir;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::app::{AdminPolicy, AppState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reset::Ingest;
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
    let data = DataDir::new(&config.data_dir);
    data.create()
        .with_context(|| format!("preparing the data dir {}", config.data_dir.display()))?;
    let writer_id = config.writer_id();
    // Held for the life of the process: no receiver or other API writes this writer's logs.
    let _lock = data.lock_writer(&writer_id)?;
    let ingest = Ingest::new(data.clone(), &writer_id)?;
    reset::empty_trash(&data);
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
    let reader: Arc<dyn ipevent_core::store::Store + Send + Sync> = match &config.store {
        None => Arc::new(data.clone()),
        Some(url) => {
            let url: ipevent_store_s3::StoreUrl = url.parse()?;
            Arc::new(ipevent_store_s3::Bucket::from_env(url)?)
        }
    };
    let result = runtime.block_on(serve(config, data, writer_id, ingest, Arc::clone(&reader)));
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

async fn serve(
    config: Config,
    data: DataDir,
    writer_id: String,
    ingest: Ingest,
    reader: Arc<dyn ipevent_core::store::Store + Send + Sync>,
) -> anyhow::Result<()> {
    // Handlers first, so a signal that comes right after readiness is a clean stop.
    let mut sigterm = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("handling SIGINT")?;

    let metrics = Arc::new(Metrics::default());
    let syncer = {
        let metrics = metrics.clone();
        Syncer::new(data.clone(), config.sync_timeout(), move |outcome| {
            metrics.sync_round(outcome)
        })
    };
    let state = Arc::new(AppState {
        data: data.clone(),
        reader,
        syncer,
        metrics,
        gate: Arc::default(),
        ingest: Arc::new(Mutex::new(ingest)),
        admin: AdminPolicy {
            token: config.admin_token.clone(),
            allow_loopback: config.allow_loopback_admin,
        },
        control_timeout: config.sync_timeout(),
    });
    let app: Router = app::router(state, config.request_timeout());

    let listener = listen::bind(config.listen)?;
    let listener =
        tokio::net::TcpListener::from_std(listener).context("registering the listener")?;
    let bound = listener.local_addr().context("reading the bound address")?;
    announce(&config, bound, &writer_id)?;

    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop_signal(&mut sigterm, &mut sigint).await })
    .await
    .context("serving HTTP")?;
    log::info!("stopped");
    Ok(())
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
