//! `ipevent-query`: the operator's CLI. Prints the report of one app, lists the known apps,
//! forgets one app.
//!
//! Exit codes: 0 success; 1 unknown app; 2 malformed SHA, unreadable `--apk` file, usage, or
//! `forget` without `--store` on a receiver that ships to a bucket; 3 the store could not be
//! read or changed (or, with `--store`, a writer did not confirm a forget), or the result
//! could not be written.
//!
//! With `--store s3://BUCKET/PREFIX` it reads the bucket every receiver ships to instead of
//! the local tree, merging all of them.

#![forbid(unsafe_code)]

mod watch;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ipevent_core::apk;
use ipevent_core::capacity::{self, CapacityInput};
use ipevent_core::control::{self, SyncOutcome};
use ipevent_core::forget::{self, ForgetError};
use ipevent_core::lookup::{self, Cidr, CidrError};
use ipevent_core::report::{report_json, JsonView};
use ipevent_core::store::{self, DataDir, Store};
use ipevent_core::AppSha;
use ipevent_store_s3::{Bucket, StoreUrl};

/// How long `--sync` waits for each receiver to drain and flush.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `forget --store` waits for every receiver shipping to the bucket to apply it:
/// each looks every ship interval, and holds its data dir's receivers for a moment.
const FORGET_TIMEOUT: Duration = Duration::from_secs(30);

/// Prints which addresses an app talked to were normal (good) and which were not (bad):
/// `{"count":N,"good_ips":[...],"bad_ips":[...]}`.
#[derive(Parser, Debug)]
#[command(name = "ipevent-query", version, about, subcommand_negates_reqs = true)]
struct Cli {
    /// Directory of the store.
    #[arg(long, env = "IPEVENT_DATA_DIR", default_value = ipevent_core::DEFAULT_DATA_DIR, global = true)]
    data_dir: PathBuf,

    /// Read this store instead of the data dir: `s3://BUCKET/PREFIX`, where receivers ship
    /// with the same --store. The endpoint and credentials come only from AWS_ENDPOINT_URL,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_ALLOW_HTTP.
    #[arg(long, env = "IPEVENT_STORE", global = true)]
    store: Option<String>,

    /// Indent the JSON.
    #[arg(long, global = true)]
    pretty: bool,

    /// First ask every running receiver on this data dir to drain its sockets and flush, so
    /// everything that reached them is reported. With --store, ask every receiver that ships
    /// to the bucket, on any host, to drain, flush and ship (through a request in the bucket),
    /// and name those that do not answer within 10 s.
    #[arg(long, global = true)]
    sync: bool,

    /// Add the chosen /28 and, per address, its count and first and last arrival.
    #[arg(long)]
    detail: bool,

    /// The app's SHA-256 (64 hex digits).
    sha: Option<String>,

    /// Report the app whose package file this is: its SHA-256 is computed (streamed, in fixed
    /// chunks) and printed on stderr, then the answer is the same as for that SHA.
    #[arg(long, value_name = "PATH", conflicts_with = "sha")]
    apk: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Lists the known apps with their event counts, most events first.
    List {
        /// Show at most this many apps (0: all).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Lists the apps that talked to an address, or to any address of a CIDR block, most
    /// events first: {"ip":…,"apps":[{"app_sha256":…,"count":…,"good":…,"first_seen":…,
    /// "last_seen":…}]}. `good` is true when the app's report classifies every matching address
    /// as good. The store is scanned app by app.
    Ip {
        /// An IPv4 address (185.220.101.7) or CIDR block (185.220.101.0/24).
        addr: String,
    },
    /// Follows the store and prints one JSON line each time an app gains an address its
    /// report classifies as bad ("event":"bad_address"), or its chosen netblock moves and a
    /// good address turns bad ("event":"netblock_changed"): {"event":…,"app_sha256":…,
    /// "ip":…,"count":…,"first_seen":…,"last_seen":…,"netblock":…,"previous_netblock":…}.
    /// Runs until SIGINT or SIGTERM (exit 0). With --store it follows every receiver that
    /// ships to the bucket, about one ship interval behind their flushes.
    Watch {
        /// Also report what happened from this time on (RFC 3339, 2026-12-01T17:00:00Z, or a
        /// duration ago: 15m, 2h, 3days): every app is read once first. Default: from now.
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
    /// Forgets one app everywhere: every running receiver on the data dir drains, flushes and
    /// holds its flushes for a moment, stopped receivers' journals and app indexes drop the
    /// app (their locks are taken meanwhile), the app's directory (every writer's log) is
    /// removed, and the receivers go on. Nothing received for the app before is reported
    /// afterwards; everything after is. Prints {"forgotten":SHA,"found":BOOL,"receivers":[...]}.
    /// Refused while an ipevent-api runs on the data dir (use its DELETE /events/<sha>), and
    /// when a receiver ships to a bucket (forget with --store then).
    /// With --store: forgets the app on every writer of the bucket, on every host: the forget
    /// is recorded in the bucket, every running receiver removes the app from its journal,
    /// outbox, local tree and database, the databases of stopped writers lose it at once (and
    /// their hosts' local state when they start). Succeeds once all of them did (up to 30 s);
    /// otherwise exit 3 naming the receivers that did not.
    Forget {
        /// The app's SHA-256 (64 hex digits).
        sha: String,
    },
    /// Estimates disk, inodes, memory and network for a given traffic, from the real record
    /// sizes of the store.
    Capacity {
        /// Distinct apps sending events.
        #[arg(long)]
        apps: u64,
        /// Distinct addresses per app (an app on one /28 has up to 14).
        #[arg(long)]
        addresses_per_app: u64,
        /// Events per second, all apps and receivers together.
        #[arg(long)]
        events_per_sec: f64,
        /// How long the traffic runs, in days.
        #[arg(long)]
        days: f64,
        /// The receivers' flush interval.
        #[arg(long, default_value_t = 1000)]
        flush_interval_ms: u64,
        /// Receivers writing to the data dir.
        #[arg(long, default_value_t = 1)]
        writers: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// A failure and the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    if let Some(Sub::Watch { since }) = &cli.command {
        // Lines are printed as they come, not as one result.
        return match follow(&cli, since.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => {
                eprintln!("ipevent-query: {}", failure.message);
                ExitCode::from(failure.code)
            }
        };
    }
    match run(&cli) {
        Ok(output) => print_output(&output),
        Err(failure) => {
            eprintln!("ipevent-query: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Writes the result to stdout. A reader that went away (`ipevent-query list | head -1`) ends
/// the output quietly; any other failure to write is a one-line error, exit 3.
fn print_output(output: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{output}").and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipevent-query: writing the result to stdout: {e}");
            ExitCode::from(3)
        }
    }
}

/// Warnings go to stderr through the logging facade, one line each, as
/// `ipevent-query: warning: ...`; `RUST_LOG` can raise or lower the level (default `warn`).
fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|out, record| {
            let level = match record.level() {
                log::Level::Warn => "warning".to_string(),
                other => other.as_str().to_lowercase(),
            };
            writeln!(out, "ipevent-query: {level}: {}", record.args())
        })
        .init();
}

/// `watch`: follows the data dir, or with `--store` the bucket.
fn follow(cli: &Cli, since: Option<&str>) -> Result<(), Failure> {
    let data = DataDir::new(&cli.data_dir);
    let (store, name) = open_store(cli, &data)?;
    watch::run(store.as_ref(), &name, since)
}

fn run(cli: &Cli) -> Result<String, Failure> {
    let data = DataDir::new(&cli.data_dir);
    match (&cli.command, &cli.sha) {
        (Some(Sub::List { limit }), _) => {
            let (store, _) = open_store(cli, &data)?;
            sync_if_asked(cli, &data);
            list(store.as_ref(), *limit, cli.pretty)
        }
        // Run by `main`, which prints its lines as they come.
        (Some(Sub::Watch { since }), _) => follow(cli, since.as_deref()).map(|()| String::new()),
        (Some(Sub::Forget { sha }), _) => {
            let app: AppSha = sha
                .parse()
                .map_err(|e| Failure::new(2, format!("{sha:?} is not an app SHA-256: {e}")))?;
            forget_app(cli, &data, &app)
        }
        (Some(Sub::Ip { addr }), _) => {
            let cidr: Cidr = addr
                .parse()
                .map_err(|e: CidrError| Failure::new(2, e.to_string()))?;
            let (store, _) = open_store(cli, &data)?;
            sync_if_asked(cli, &data);
            by_address(store.as_ref(), cidr, cli.pretty)
        }
        (
            Some(Sub::Capacity {
                apps,
                addresses_per_app,
                events_per_sec,
                days,
                flush_interval_ms,
                writers,
                json,
            }),
            _,
        ) => {
            let input = CapacityInput {
                apps: *apps,
                addresses_per_app: *addresses_per_app,
                events_per_sec: *events_per_sec,
                days: *days,
                flush_interval_ms: *flush_interval_ms,
                writers: *writers,
            };
            input
                .validate()
                .map_err(|e| Failure::new(2, e.to_string()))?;
            let estimate = capacity::estimate(&input);
            Ok(if *json {
                serde_json::to_string_pretty(&estimate).expect("estimates serialise")
            } else {
                estimate.to_string()
            })
        }
        (None, Some(sha)) => {
            let app: AppSha = sha
                .parse()
                .map_err(|e| Failure::new(2, format!("{sha:?} is not an app SHA-256: {e}")))?;
            let (store, name) = open_store(cli, &data)?;
            sync_if_asked(cli, &data);
            report(store.as_ref(), &name, &app, cli)
        }
        (None, None) => {
            let Some(path) = &cli.apk else {
                return Err(Failure::new(
                    2,
                    "give an app SHA-256, --apk PATH, or a command (`list`); see --help",
                ));
            };
            let app = apk::sha256_file(path).map_err(|e| Failure::new(2, e.to_string()))?;
            eprintln!("ipevent-query: {} has SHA-256 {app}", path.display());
            let (store, name) = open_store(cli, &data)?;
            sync_if_asked(cli, &data);
            report(store.as_ref(), &name, &app, cli)
        }
    }
}

/// `forget SHA`: exit 2 when a receiver's store cannot forget (a receiver shipping to a
/// bucket, without `--store`), 3 when a receiver could not be held or the store not changed
/// (nothing was removed); with `--store`, 3 as well when a writer of the bucket did not apply
/// the forget in time.
fn forget_app(cli: &Cli, data: &DataDir, app: &AppSha) -> Result<String, Failure> {
    if let Some(url) = &cli.store {
        return forget_in_bucket(cli, url, app);
    }
    let done = forget::forget_app(data, app, SYNC_TIMEOUT, None, || Ok(true)).map_err(|e| {
        let code = match e {
            ForgetError::Unsupported(_) => 2,
            ForgetError::Receivers(_) | ForgetError::Store(_) => 3,
        };
        Failure::new(code, format!("forgetting app {app}: {e}"))
    })?;
    let value = serde_json::json!({
        "forgotten": app.to_hex(),
        "found": done.found,
        "receivers": done.receivers,
    });
    Ok(if cli.pretty {
        serde_json::to_string_pretty(&value)
    } else {
        serde_json::to_string(&value)
    }
    .expect("JSON values serialise"))
}

/// `forget SHA --store`: through the bucket's forget log, applied by every writer of the
/// bucket ([`Bucket::forget`]); succeeds only once every one of them has.
fn forget_in_bucket(cli: &Cli, url: &str, app: &AppSha) -> Result<String, Failure> {
    let url: StoreUrl = url.parse().map_err(|e| Failure::new(2, format!("{e}")))?;
    let name = url.to_string();
    let bucket =
        std::sync::Arc::new(Bucket::from_env(url).map_err(|e| Failure::new(3, e.to_string()))?);
    let fail = |e: ipevent_store_s3::S3Error| {
        Failure::new(3, format!("forgetting app {app} in {name}: {e}"))
    };
    let found = bucket.read_app(app).map_err(fail)?.is_some();
    let done = bucket.forget(app, FORGET_TIMEOUT).map_err(fail)?;
    if !done.complete() {
        return Err(Failure::new(
            3,
            format!(
                "forgetting app {app} in {name}: not confirmed: receivers {} did not apply the \
                 forget within {FORGET_TIMEOUT:?}, so their databases may still report the app; \
                 it is recorded in the bucket and they apply it when they next run (run the \
                 forget again to confirm)",
                done.missing.join(", ")
            ),
        ));
    }
    let value = done.answer(app, found);
    Ok(if cli.pretty {
        serde_json::to_string_pretty(&value)
    } else {
        serde_json::to_string(&value)
    }
    .expect("JSON values serialise"))
}

fn store_failure(e: store::StoreError) -> Failure {
    Failure::new(3, format!("reading the store: {e}"))
}

/// The store to read and its name for messages: the data dir, or the bucket of `--store`.
fn open_store(cli: &Cli, data: &DataDir) -> Result<(Box<dyn Store>, String), Failure> {
    let Some(url) = &cli.store else {
        return Ok((Box::new(data.clone()), data.root().display().to_string()));
    };
    let url: StoreUrl = url.parse().map_err(|e| Failure::new(2, format!("{e}")))?;
    let name = url.to_string();
    let bucket = Bucket::from_env(url).map_err(|e| Failure::new(3, e.to_string()))?;
    Ok((Box::new(bucket), name))
}

fn report(store: &dyn Store, name: &str, app: &AppSha, cli: &Cli) -> Result<String, Failure> {
    let view = JsonView {
        detail: cli.detail,
        pretty: cli.pretty,
    };
    let Some(report) = report_json(store, app, view).map_err(store_failure)? else {
        return Err(Failure::new(
            1,
            format!("no events for app {app} in {name}"),
        ));
    };
    for (path, offset) in &report.torn {
        log::warn!(
            "{} has an unverified tail from byte {offset} on; it is not counted",
            path.display()
        );
    }
    for (_, why) in &report.unreadable {
        eprintln!("ipevent-query: warning: {why}; not counted");
    }
    Ok(report.json)
}

fn by_address(store: &dyn Store, cidr: Cidr, pretty: bool) -> Result<String, Failure> {
    let found = lookup::apps_by_address(store, cidr).map_err(store_failure)?;
    for (app, why) in &found.unreadable {
        log::warn!("app {app} could not be read ({why}); left out");
    }
    Ok(if pretty {
        serde_json::to_string_pretty(&found.report)
    } else {
        serde_json::to_string(&found.report)
    }
    .expect("address reports serialise"))
}

fn list(store: &dyn Store, limit: usize, pretty: bool) -> Result<String, Failure> {
    let apps = store.list_apps().map_err(store_failure)?;
    let shown = if limit == 0 {
        apps.len()
    } else {
        limit.min(apps.len())
    };
    for app in apps.iter().filter(|a| a.unreadable.is_some()) {
        eprintln!(
            "ipevent-query: warning: app {} is not fully readable: {}",
            app.app,
            app.unreadable.as_deref().unwrap_or_default()
        );
    }
    let rows: Vec<ListRow> = apps[..shown]
        .iter()
        .map(|a| ListRow {
            app_sha256: a.app.to_hex(),
            count: a.count,
            unreadable: a.unreadable.as_deref(),
        })
        .collect();
    Ok(if pretty {
        serde_json::to_string_pretty(&rows)
    } else {
        serde_json::to_string(&rows)
    }
    .expect("list rows serialise"))
}

/// One line of `list`: serialised straight from the struct (a million apps print in a
/// fraction of the time a JSON map per app took), keys in the order they always had.
#[derive(serde::Serialize)]
struct ListRow<'a> {
    app_sha256: String,
    count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    unreadable: Option<&'a str>,
}

/// With `--sync`, asks every running receiver to drain and flush. A receiver that cannot is
/// reported on stderr; the query then shows what is on disk. With `--store`, the request goes
/// through the bucket to every receiver that ships there, on any host.
fn sync_if_asked(cli: &Cli, data: &DataDir) {
    if !cli.sync {
        return;
    }
    if let Some(url) = &cli.store {
        sync_cluster(url);
        return;
    }
    match control::sync_all(data, SYNC_TIMEOUT) {
        Ok(summary) if summary.outcome() == SyncOutcome::None => log::warn!(
            "no receiver is running on {}; showing what is on disk",
            data.root().display()
        ),
        Ok(summary) => {
            for (writer_id, e) in summary.failed {
                log::warn!("receiver {writer_id} did not sync ({e}); showing what is on disk");
            }
        }
        Err(e) => log::warn!("looking for receivers: {e}"),
    }
}

/// `--sync --store`: every receiver that ships to the bucket drains, flushes and ships; the
/// ones that do not answer within [`SYNC_TIMEOUT`] are named.
fn sync_cluster(url: &str) {
    let synced = url
        .parse::<StoreUrl>()
        .and_then(Bucket::from_env)
        .and_then(|bucket| bucket.sync_all(SYNC_TIMEOUT));
    match synced {
        Ok(outcome) if outcome.answered.is_empty() && outcome.missing.is_empty() => {
            log::warn!("no receiver is shipping to {url}; showing what the bucket holds")
        }
        Ok(outcome) => {
            if !outcome.missing.is_empty() {
                log::warn!(
                    "receivers {} did not answer the sync within {SYNC_TIMEOUT:?}; \
                     what they received lately may be missing",
                    outcome.missing.join(", ")
                );
            }
        }
        Err(e) => log::warn!("sync through {url}: {e}; showing what the bucket holds"),
    }
}
