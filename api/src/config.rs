//! Command-line flags and environment variables of the API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

/// Serves the ipevent store over HTTP: reports at `GET /events/{sha}`, a reset at
/// `DELETE /events`, protobuf ingestion at `POST /events`, and `/metrics`. Every setting can
/// also come from the environment variable shown.
#[derive(Parser, Debug, Clone)]
#[command(name = "ipevent-api", version = ipevent_core::VERSION, about, long_about = None)]
pub struct Config {
    /// HTTP address to listen on. `[::]:PORT` serves IPv6 and IPv4 (dual stack) and falls
    /// back to `0.0.0.0:PORT` on a host without IPv6.
    #[arg(long, env = "IPEVENT_API_LISTEN", default_value = ipevent_core::DEFAULT_HTTP_LISTEN)]
    pub listen: SocketAddr,

    /// Directory of the store, shared with the receivers (created 0750 if missing).
    #[arg(long, env = "IPEVENT_DATA_DIR", default_value = ipevent_core::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Answer `GET /events/:sha` (and `GET /watch`, following every receiver) from this
    /// store, `s3://BUCKET/PREFIX`, where the receivers ship with the same --store, instead
    /// of the data dir. The endpoint and credentials come
    /// only from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
    /// AWS_ALLOW_HTTP.
    #[arg(long, env = "IPEVENT_STORE")]
    pub store: Option<String>,

    /// Bearer token that allows `DELETE /events` from any peer
    /// (`Authorization: Bearer <token>`). Without it, only loopback peers may reset.
    /// At least 16 bytes of printable ASCII (`openssl rand -hex 32`); a shorter token stops
    /// the API at start.
    #[arg(long, env = "IPEVENT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Let loopback peers reset without the token. With `false`, every reset needs the token.
    #[arg(long, env = "IPEVENT_API_ALLOW_LOOPBACK_ADMIN", default_value_t = true,
          action = ArgAction::Set, value_name = "BOOL")]
    pub allow_loopback_admin: bool,

    /// How long to wait for each receiver to drain and flush (or to begin and end a reset),
    /// in milliseconds. With --store, also how long a reset or a forget of one app waits for
    /// every receiver shipping to the bucket to apply it.
    #[arg(long, env = "IPEVENT_API_SYNC_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub sync_timeout_ms: u64,

    /// Longest time one request may take before it is answered 503, in milliseconds.
    #[arg(long, env = "IPEVENT_API_REQUEST_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub request_timeout_ms: u64,

    /// Most HTTP connections open at once. Beyond it, the connection that has waited longest
    /// for a request is closed to make room (never one being answered). Lowered to the
    /// open-files limit less 256 when that is smaller.
    #[arg(long, env = "IPEVENT_API_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub max_connections: u64,

    /// Time a connection has to send a complete request head, from opening or from its
    /// previous answer, in milliseconds: the header-read timeout, and how long an idle
    /// kept-alive connection stays open.
    #[arg(long, env = "IPEVENT_API_HEADER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub header_timeout_ms: u64,

    /// Most `GET /watch` streams open at once (each a connection for as long as its client
    /// stays); beyond it, 503. At most half of --max-connections.
    #[arg(long, env = "IPEVENT_API_MAX_WATCH_STREAMS", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_watch_streams: u64,

    /// Name of the API's own log files in the store (events taken by `POST /events`).
    /// Must differ from every receiver's writer id. Defaults to `api-<host name>`.
    #[arg(long, env = "IPEVENT_API_WRITER_ID", value_parser = parse_writer_id)]
    pub writer_id: Option<String>,

    /// Refuse to run as root, with a one-line error (the packaged unit passes it). Without
    /// it, root is allowed with one warning.
    #[arg(long, env = "IPEVENT_REFUSE_ROOT", default_value_t = false)]
    pub refuse_root: bool,

    /// Once listening, write the bound address (e.g. `127.0.0.1:40123`) to this file,
    /// atomically, so scripts and tests learn a port chosen by the kernel.
    #[arg(long, env = "IPEVENT_API_READY_FILE")]
    pub ready_file: Option<PathBuf>,
}

impl Config {
    /// The writer id: the flag, or `api-` and the host name reduced to the characters a
    /// writer id allows.
    pub fn writer_id(&self) -> String {
        self.writer_id
            .clone()
            .unwrap_or_else(|| ipevent_core::store::host_writer_id("api-"))
    }

    /// [`Config::sync_timeout_ms`] as a duration.
    pub fn sync_timeout(&self) -> Duration {
        Duration::from_millis(self.sync_timeout_ms)
    }

    /// [`Config::request_timeout_ms`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

fn parse_writer_id(value: &str) -> Result<String, String> {
    ipevent_core::store::validate_writer_id(value)
        .map(|()| value.to_string())
        .map_err(|e| e.to_string())
}
