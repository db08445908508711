//! Command-line flags and environment variables of the receiver.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Receives IpEvent datagrams over UDP, validates them and appends them to the SHA-keyed
/// store in the data dir. Every setting can also come from the environment variable shown.
#[derive(Parser, Debug, Clone)]
#[command(name = "ipevent-receiver", version, about, long_about = None)]
pub struct Config {
    /// UDP address to listen on; repeat for several. `[::]:PORT` listens on IPv6 and IPv4.
    #[arg(
        long = "listen",
        env = "IPEVENT_LISTEN",
        value_delimiter = ',',
        default_value = ipevent_core::DEFAULT_UDP_LISTEN
    )]
    pub listen: Vec<SocketAddr>,

    /// Directory of the store (created 0750 if missing).
    #[arg(long, env = "IPEVENT_DATA_DIR", default_value = ipevent_core::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Name of this receiver's files in the store; receivers sharing a data dir need
    /// different ids. Defaults to the host name.
    #[arg(long, env = "IPEVENT_WRITER_ID")]
    pub writer_id: Option<String>,

    /// How often accepted events are appended to the store, in milliseconds.
    #[arg(long, env = "IPEVENT_FLUSH_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub flush_interval_ms: u64,

    /// Receive buffer to ask for per socket, in bytes. The kernel caps it at
    /// net.core.rmem_max unless the process may use SO_RCVBUFFORCE (CAP_NET_ADMIN).
    #[arg(long, env = "IPEVENT_RCVBUF_BYTES", default_value_t = 32 << 20)]
    pub rcvbuf_bytes: usize,

    /// Ingest threads. Above 1, each thread gets its own socket per listen address through
    /// SO_REUSEPORT and the kernel spreads senders over them by flow.
    #[arg(long, env = "IPEVENT_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,

    /// How often the stats file is rewritten, in milliseconds.
    #[arg(long, env = "IPEVENT_STATS_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub stats_interval_ms: u64,

    /// How often counters are logged, in seconds (0: never).
    #[arg(long, env = "IPEVENT_LOG_INTERVAL_S", default_value_t = 60)]
    pub log_interval_s: u64,

    /// Accepted (app, address) pairs held in memory before a flush is forced early.
    #[arg(long, env = "IPEVENT_MAX_PENDING_ENTRIES", default_value_t = 1 << 22,
          value_parser = clap::value_parser!(u64).range(1..=1 << 28))]
    pub max_pending_entries: u64,

    /// Size of the journal, in bytes: accepted events wait there (and in memory) until they
    /// are in the store, so it bounds how much a stalled store (disk full) can hold back.
    #[arg(long, env = "IPEVENT_JOURNAL_BYTES", default_value_t = 256 << 20)]
    pub journal_bytes: u64,

    /// Most apps the store may hold; events of further new apps are counted (events_refused)
    /// and dropped. 0: no limit.
    #[arg(long, env = "IPEVENT_MAX_APPS", default_value_t = 0)]
    pub max_apps: u64,

    /// Most distinct addresses this receiver stores for one app; events of further new
    /// addresses of that app are counted (events_refused, reason address_limit) and dropped,
    /// so that no single app can grow a log without bound. 0: no limit.
    #[arg(long, env = "IPEVENT_MAX_ADDRESSES_PER_APP", default_value_t = 1 << 24)]
    pub max_addresses_per_app: u64,

    /// No directory for a new app is created while the data dir's file system has less free
    /// space than this, in bytes; such events are counted (events_refused) and dropped.
    #[arg(long, env = "IPEVENT_MIN_FREE_BYTES", default_value_t = 100 << 20)]
    pub min_free_bytes: u64,

    /// Likewise for free inodes.
    #[arg(long, env = "IPEVENT_MIN_FREE_INODES", default_value_t = 10_000)]
    pub min_free_inodes: u64,

    /// Remove every app whose newest event is older than this many days: a sweep at start
    /// and then every hour, in the background (ingest never waits for it). Removals are
    /// counted (apps_expired) and logged. 0: keep everything. With --store the sweep judges
    /// each app's newest event over the whole bucket (every receiver's database) and removes
    /// expired apps from every writer, as `ipevent-query --store … forget` does; one receiver
    /// of the cluster needs the flag.
    #[arg(long, env = "IPEVENT_RETAIN_DAYS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub retain_days: u64,

    /// Refuse to run as root, with a one-line error (the packaged units pass it). Without it,
    /// root is allowed with one warning.
    #[arg(long, env = "IPEVENT_REFUSE_ROOT", default_value_t = false)]
    pub refuse_root: bool,

    /// Accepted for compatibility and ignored: root is allowed unless --refuse-root is given.
    #[arg(long, env = "IPEVENT_ALLOW_ROOT", default_value_t = false, hide = true)]
    pub allow_root: bool,

    /// Test hook: abort after writing this many apps in a flush (simulates a crash mid-flush).
    #[arg(long, hide = true)]
    pub test_crash_after_apps: Option<usize>,

    /// Also ship every flush to this store, `s3://BUCKET/PREFIX`, through a local outbox
    /// (`receivers/<writer-id>/outbox/`). The endpoint and credentials come only from
    /// AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
    /// AWS_ALLOW_HTTP. Without it, the local data dir is the only store.
    #[arg(long, env = "IPEVENT_STORE")]
    pub store: Option<String>,

    /// With --store: how often, at most, the shipper ships the flushes that came since its
    /// last round, as one write batch, and makes them visible to readers of the bucket, in
    /// milliseconds. Flushes that come within one interval go together: an app in each of
    /// them costs the bucket its keys once. Readers see a flush at most about this much
    /// later (plus the round itself); `--sync` ships at once. The shipper looks at the
    /// bucket (sync requests, resets, forgets) every second, or this often if shorter.
    #[arg(long, env = "IPEVENT_SHIP_INTERVAL_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub ship_interval_ms: u64,

    /// fdatasync every log after appending to it, so a completed flush survives a power loss
    /// (costs one disk sync per app per flush).
    #[arg(long, env = "IPEVENT_FSYNC", default_value_t = false)]
    pub fsync: bool,
}

impl Config {
    /// The writer id: the flag, or the host name reduced to the characters a writer id allows.
    pub fn writer_id(&self) -> String {
        self.writer_id
            .clone()
            .unwrap_or_else(|| ipevent_core::store::host_writer_id(""))
    }
}
