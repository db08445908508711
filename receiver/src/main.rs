//! `ipevent-receiver`: receives IpEvent datagrams over UDP and appends them to the store.
//!
//! Wiring only: sockets, the store writer thread, the ingest threads and the control socket,
//! each set up by one named step of [`run`].
//! See ARCHITECTURE.md for how they fit together.

#![forbid(unsafe_code)]

mod config;
mod control;
mod counters;
mod ingest;
mod retention;
mod run_state;
mod ship;
mod sockets;
mod writer;

use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipevent_core::journal::Journal;
use ipevent_core::stats::ReceiverStats;
use ipevent_core::store::{self, DataDir};

use crate::config::Config;
use crate::control::Control;
use crate::counters::Counters;
use crate::ingest::{Ingest, Lead, Peer};
use crate::writer::{BatchPool, ToWriter, Writer, WriterSettings, MAX_POOL_BATCHES};

fn main() -> ExitCode {
    let config = Config::parse();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,slatedb=warn"),
    )
    .format_target(false)
    .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipevent-receiver: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> Result<()> {
    ipevent_core::privilege::check_root("ipevent-receiver", config.refuse_root)?;
    if config.allow_root {
        log::debug!("--allow-root is no longer needed: root is allowed unless --refuse-root");
    }
    let writer_id = config.writer_id();
    store::validate_writer_id(&writer_id)?;
    let data = DataDir::new(&config.data_dir);
    data.create()
        .with_context(|| format!("preparing data dir {}", config.data_dir.display()))?;
    store::create_dir_all(&data.receiver_dir(&writer_id))?;
    let _lock = data.lock_writer(&writer_id)?;
    // Bound before anything that takes time (the journal's replay) and before the UDP sockets:
    // from here on, a request waits for the receiver to be ready instead of finding nobody,
    // and a sync covers every datagram that can have reached our sockets.
    let control_path = data.control_socket(&writer_id);
    let control = control::bind(&control_path)?;
    let shipping = match &config.store {
        Some(url) => Some(start_shipping(&config, &data, &writer_id, url)?),
        None => None,
    };
    let previous = read_previous_run(&data, &writer_id);

    let sockets = bind_sockets(&config)?;
    let journal = Journal::open(&data.journal_path(&writer_id), config.journal_bytes)?;
    // The journal, not this file, is what recovery relies on: a full disk must not stop a start.
    if let Err(e) = run_state::write_state(&data, &writer_id, previous.epoch, false) {
        log::warn!("recording the run state: {e}");
    }

    let counters = Arc::new(Counters::default());
    // Room for every batch that can exist plus each thread's markers.
    let threads = sockets.per_thread.len();
    let (to_writer, from_ingest) = crossbeam_channel::bounded(MAX_POOL_BATCHES + 4 * threads);
    let (free_rx, free_tx) = BatchPool::new(counters.clone());
    let stats_base = first_stats(&config, &writer_id, &previous, &sockets);
    let settings = writer_settings(&config, &data, &writer_id, stats_base, previous.epoch);

    // Ingest threads first (they take their first batch from the pool), then the writer,
    // whose first act is to publish the stats file that tells the world we are ready.
    let listen = sockets.listen.clone();
    let ingest = start_ingest(sockets, to_writer, free_rx, &counters, control, &writer_id)?;
    let retention_counters = Arc::clone(&counters);
    let mut writer = Writer::new(settings, counters, from_ingest, free_tx, journal)?;
    let mut bucket = None;
    let shipper = shipping.map(|(outbox, counters, shipper, shipping_to)| {
        writer.ship_through(outbox, counters);
        bucket = Some(shipping_to);
        shipper
    });
    let writer_handle = std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || writer.run())
        .context("starting the writer thread")?;
    announce(&config, &listen, threads, &writer_id);
    // Stopped when dropped, at the end of this function.
    let _retention = match config.retain_days {
        0 => None,
        days => Some(
            retention::start(
                data.clone(),
                bucket,
                days,
                retention_counters,
                run_state::unix_now,
            )
            .context("starting the retention sweep")?,
        ),
    };

    let ingest_result = ingest.run_until_stopped();
    let (epoch, flushed_all) = match writer_handle.join() {
        Ok(result) => result,
        Err(_) => bail!("the writer thread panicked"),
    };
    let _ = std::fs::remove_file(&control_path);
    if let Some(shipper) = shipper {
        shipper.stop();
    }
    ingest_result?;
    if !flushed_all {
        bail!("stopped with events that could not be written to the store (see above)");
    }
    if let Err(e) = run_state::write_state(&data, &writer_id, epoch, true) {
        // Everything is in the store; the next start only misreads this stop as a crash.
        log::warn!("recording the clean stop: {e}");
    }
    log::info!("stopped cleanly at flush epoch {epoch}");
    Ok(())
}

/// How the previous run of this writer ended; warns when it did not stop cleanly.
fn read_previous_run(data: &DataDir, writer_id: &str) -> run_state::RunState {
    let previous = run_state::read_state(data, writer_id);
    if !previous.clean {
        log::warn!(
            "the previous run of writer {writer_id} did not stop cleanly (crash, kill or power \
             loss); what it had accepted is recovered from its journal"
        );
    }
    previous
}

/// The UDP sockets: one per listen address for each ingest thread.
struct Sockets {
    /// Thread t's sockets, in the order of the listen addresses.
    per_thread: Vec<Vec<std::net::UdpSocket>>,
    /// The bound addresses (with the port the kernel chose for port 0).
    listen: Vec<String>,
    /// The receive buffer the kernel granted each socket.
    rcvbuf_bytes: Vec<u64>,
}

/// Binds every socket. With port 0, the later threads join the port the first one got.
fn bind_sockets(config: &Config) -> Result<Sockets> {
    let threads = usize::from(config.threads);
    let reuse_port = threads > 1;
    let mut sockets = Sockets {
        per_thread: Vec::with_capacity(threads),
        listen: Vec::new(),
        rcvbuf_bytes: Vec::new(),
    };
    for t in 0..threads {
        let mut mine = Vec::new();
        for (i, wanted) in config.listen.iter().enumerate() {
            let addr = if t == 0 {
                *wanted
            } else {
                listen_addr(&sockets.listen, i)
            };
            let bound = sockets::bind(addr, config.rcvbuf_bytes, reuse_port)?;
            if t == 0 {
                sockets::report_buffer(&bound, config.rcvbuf_bytes);
                sockets.listen.push(bound.local.to_string());
            }
            sockets.rcvbuf_bytes.push(bound.rcvbuf_bytes as u64);
            mine.push(bound.socket);
        }
        sockets.per_thread.push(mine);
    }
    Ok(sockets)
}

/// What every stats snapshot of this run starts from.
fn first_stats(
    config: &Config,
    writer_id: &str,
    previous: &run_state::RunState,
    sockets: &Sockets,
) -> ReceiverStats {
    ReceiverStats {
        writer_id: writer_id.to_string(),
        pid: std::process::id(),
        version: ipevent_core::VERSION.to_string(),
        started_unix: run_state::unix_now(),
        last_stop_clean: previous.clean,
        listen: sockets.listen.clone(),
        rcvbuf_bytes: sockets.rcvbuf_bytes.clone(),
        store: config.store.clone().unwrap_or_default(),
        ..ReceiverStats::default()
    }
}

fn writer_settings(
    config: &Config,
    data: &DataDir,
    writer_id: &str,
    stats_base: ReceiverStats,
    state_epoch: u64,
) -> WriterSettings {
    WriterSettings {
        data: data.clone(),
        writer_id: writer_id.to_string(),
        flush_interval: Duration::from_millis(config.flush_interval_ms),
        stats_interval: Duration::from_millis(config.stats_interval_ms),
        log_interval: (config.log_interval_s > 0)
            .then(|| Duration::from_secs(config.log_interval_s)),
        max_pending_entries: usize::try_from(config.max_pending_entries).unwrap_or(usize::MAX),
        fsync: config.fsync,
        crash_after_apps: config.test_crash_after_apps,
        limits: store::StoreLimits {
            max_apps: (config.max_apps > 0).then_some(config.max_apps),
            min_free_bytes: config.min_free_bytes,
            min_free_inodes: config.min_free_inodes,
            max_addresses_per_app: (config.max_addresses_per_app > 0)
                .then_some(config.max_addresses_per_app),
        },
        stats_base,
        state_epoch,
    }
}

/// The ingest threads: the lead (which runs on the main thread and serves the control
/// socket) and the others, already running.
struct IngestThreads {
    lead: Ingest,
    others: Vec<std::thread::JoinHandle<Result<()>>>,
}

/// Starts every ingest thread but the lead, and sets the lead up with its peers and the
/// control socket.
fn start_ingest(
    sockets: Sockets,
    to_writer: crossbeam_channel::Sender<ToWriter>,
    free_rx: BatchPool,
    counters: &Arc<Counters>,
    control: UnixListener,
    writer_id: &str,
) -> Result<IngestThreads> {
    let mut per_thread = sockets.per_thread.into_iter();
    let lead_sockets = per_thread.next().expect("at least one thread");
    let mut peers = Vec::new();
    let mut others = Vec::new();
    for (t, socks) in per_thread.enumerate() {
        let (ctl_tx, ctl_rx) = crossbeam_channel::bounded(64);
        let (ingest, waker) = Ingest::new(
            socks,
            to_writer.clone(),
            free_rx.clone(),
            counters.clone(),
            ctl_rx,
        )?;
        peers.push(Peer { ctl: ctl_tx, waker });
        let handle = std::thread::Builder::new()
            .name(format!("ingest-{}", t + 1))
            .spawn(move || ingest.run())
            .context("starting an ingest thread")?;
        others.push(handle);
    }
    let (_unused_tx, lead_ctl) = crossbeam_channel::bounded(1);
    let (mut lead, _lead_waker) =
        Ingest::new(lead_sockets, to_writer, free_rx, counters.clone(), lead_ctl)?;
    let control = Control::new(control, writer_id.to_string(), counters.clone());
    lead.lead(Lead::new(control, peers)?)?;
    Ok(IngestThreads { lead, others })
}

impl IngestThreads {
    /// Runs the lead until a stop signal, then waits for the others; the first failure wins.
    fn run_until_stopped(self) -> Result<()> {
        let mut failed = self.lead.run().err();
        for handle in self.others {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => failed = failed.or(Some(anyhow::anyhow!("an ingest thread panicked"))),
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

fn announce(config: &Config, listen: &[String], threads: usize, writer_id: &str) {
    log::info!(
        "ipevent-receiver {} listening on {} ({} ingest thread{}); data dir {}; writer id {}; flush every {} ms",
        ipevent_core::VERSION,
        listen.join(", "),
        threads,
        if threads == 1 { "" } else { "s" },
        config.data_dir.display(),
        writer_id,
        config.flush_interval_ms
    );
}

/// Opens the outbox and starts the shipper for `--store`; fails when the bucket says another
/// receiver holds this writer id.
fn start_shipping(
    config: &Config,
    data: &DataDir,
    writer_id: &str,
    url: &str,
) -> Result<(
    ship::Outbox,
    Arc<ship::ShipCounters>,
    ship::Shipper,
    Arc<ipevent_store_s3::Bucket>,
)> {
    let url: ipevent_store_s3::StoreUrl = url.parse()?;
    let bucket = Arc::new(ipevent_store_s3::Bucket::from_env(url.clone())?);
    let counters = Arc::new(ship::ShipCounters::default());
    let (outbox, woken) = ship::Outbox::open(
        data,
        writer_id,
        config.fsync,
        config.min_free_bytes,
        Arc::clone(&counters),
    )?;
    let host = ipevent_core::store::host_writer_id("");
    let settings = ship::ShipperSettings {
        bucket: Arc::clone(&bucket),
        writer_id: writer_id.to_string(),
        instance: ship::instance_token(data, writer_id)?,
        holder: format!("host {host}, data dir {}", config.data_dir.display()),
        outbox_dir: ipevent_store_s3::outbox::dir(data, writer_id),
        data: data.clone(),
        control_socket: Some(data.control_socket(writer_id)),
        interval: Duration::from_millis(config.ship_interval_ms),
        counters: Arc::clone(&counters),
        start_wait: ship::START_WAIT,
    };
    let shipper =
        ship::Shipper::start(settings, woken).with_context(|| format!("shipping to {url}"))?;
    Ok((outbox, counters, shipper, bucket))
}

fn listen_addr(listen: &[String], i: usize) -> std::net::SocketAddr {
    listen[i].parse().expect("a bound address parses")
}
