//! `ipevent-test-client`: traffic generator, packet corrupter and verifier for ipevent.
//! Argument parsing and wiring only; the work is in the library.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipevent_core::apk;
use ipevent_core::hex::{self, HexError};
use ipevent_core::wire::{self, AppSha, IpEvent, MAX_DATAGRAM_BYTES};
use ipevent_test_client::run::{self, Limit, RunConfig, MAX_VERIFY_APPS};
use ipevent_test_client::scenario::Scenario;
use ipevent_test_client::send;
use ipevent_test_client::verify::{self, Source};

/// Datagrams a run sends when neither `--count` nor `--duration` is given.
const DEFAULT_COUNT: u64 = 100_000;

/// Apps in a random scenario when `--apps` is not given.
const DEFAULT_RANDOM_APPS: u64 = 1_000;

/// Most bytes `decode` reads from stdin: any larger input is oversize all the same.
const DECODE_INPUT_MAX_BYTES: usize = 64 * 1024;
const _: () = assert!(MAX_DATAGRAM_BYTES < DECODE_INPUT_MAX_BYTES);

/// Exit code for bad input and usage errors (as clap uses).
const EXIT_USAGE: u8 = 2;

const EXAMPLES: &str = "\
Examples:
  ipevent-test-client --to 127.0.0.1:4002 --data-dir /var/lib/ipevent
  ipevent-test-client run --scenario random --apps 1000000 --rate 0 --count 10000000 --json
  ipevent-test-client run --to receivers.example:4002 --api http://api.example:4003 --duration 60 --rate 50000 --max-drop-pct 0.1
  ipevent-test-client send --to 127.0.0.1:4002 <sha256> 10.0.0.1
  ipevent-test-client send --to 127.0.0.1:4002 --apk app.apk 10.0.0.1
  ipevent-test-client encode --hex <sha256> 10.0.0.1 | ipevent-test-client decode --hex

Exit status: 0 when every datagram was sent and the verified apps' reports match exactly;
1 when a check fails or the run cannot proceed; 2 for bad arguments.";

/// Traffic generator, packet corrupter and verifier for ipevent.
///
/// Without a subcommand it does `run`: it sends valid events mixed with corrupted datagrams to
/// the receivers, then asks the service for each checked app's report (with --data-dir or
/// --api) and verifies the count and the good and bad lists.
#[derive(Parser, Debug)]
#[command(
    name = "ipevent-test-client",
    version,
    args_conflicts_with_subcommands = true,
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Send a scenario's traffic and verify the service's reports (the default).
    Run(RunArgs),
    /// Send one event.
    Send(SendArgs),
    /// Write one event's datagram to stdout (raw bytes, or hex with --hex).
    Encode(EncodeArgs),
    /// Read one datagram from stdin and print it as JSON, or {"error":"<reason>"} with exit 1.
    Decode(DecodeArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ScenarioArg {
    /// One app talks to the 14 hosts of a /28 and 1-10 outsiders; two more apps send to the
    /// same addresses. All three are verified.
    Lookout,
    /// --apps apps, each with its own /28 and outsiders; --verify-apps of them are verified.
    Random,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Which apps send.
    #[arg(long, value_enum, default_value_t = ScenarioArg::Lookout)]
    scenario: ScenarioArg,
    /// Number of apps (random scenario only) [default: 1000].
    #[arg(long, value_name = "N")]
    apps: Option<u64>,
    /// Apps of a random scenario to verify, chosen by the seed (all when there are fewer).
    #[arg(long, value_name = "K", default_value_t = 3)]
    verify_apps: usize,
    /// Share of datagrams that are corrupted, in percent.
    #[arg(long, value_name = "P", default_value_t = 30.0, value_parser = percent)]
    corrupt_pct: f64,
    /// Share of valid datagrams sent in another valid encoding (upper-case SHA, fields
    /// reversed, unknown field, non-minimal varint, duplicate field), in percent.
    #[arg(long, value_name = "P", default_value_t = 10.0, value_parser = percent)]
    valid_variant_pct: f64,
    /// Datagrams per second; 0 sends as fast as possible.
    #[arg(long, value_name = "PER_SEC", default_value_t = 0)]
    rate: u64,
    /// Datagrams to send, valid and corrupted together [default: 100000].
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    count: Option<u64>,
    /// Send for this many seconds instead of a count.
    #[arg(long, value_name = "S", value_parser = seconds)]
    duration: Option<f64>,
    /// Seed of everything random, for a repeatable run [default: random, printed].
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Receiver HOST:PORT; repeatable. A name with several addresses gets batches round robin.
    #[arg(
        long = "to",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:4002"
    )]
    to: Vec<String>,
    /// Datagrams per sendmmsg call (1-1024) [default: 256, or 1 ms of the rate].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: Option<u16>,
    /// Verify through the API: GET URL/events/<sha>.
    #[arg(long, value_name = "URL", conflicts_with = "data_dir")]
    api: Option<String>,
    /// Verify with `ipevent-query --sync --data-dir DIR <sha>`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The ipevent-query executable [default: next to this one, else on PATH].
    #[arg(long, value_name = "PATH")]
    query_bin: Option<PathBuf>,
    /// Send at most N datagrams the receivers have not read: after each N, wait until their
    /// counters (datagrams received plus kernel drops, from stats.json in --data-dir or
    /// /metrics of --api) cover everything sent. A receiver whose socket buffer holds N
    /// datagrams then never has a reason to drop one, however busy its machine. Every target
    /// must be one of those receivers, and their counters must be up to date with earlier
    /// traffic when the run starts. 0: no window.
    #[arg(long, value_name = "N", default_value_t = 0)]
    window: u64,
    /// Share of sent events an app may miss and still pass, in percent (lossy networks).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = percent)]
    max_drop_pct: f64,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args, Debug)]
#[command(allow_missing_positional = true)]
struct SendArgs {
    /// Receiver HOST:PORT.
    #[arg(
        long = "to",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:4002"
    )]
    to: String,
    /// Send for the app whose package file this is, instead of a SHA: its SHA-256 is computed
    /// (streamed, in fixed chunks) and printed on stderr.
    #[arg(long, value_name = "PATH", conflicts_with = "sha")]
    apk: Option<PathBuf>,
    /// The app's SHA-256 (64 hex digits); left out with --apk.
    sha: Option<String>,
    /// The IPv4 address (dotted, or an integer 0-4294967295).
    ip: String,
}

#[derive(Args, Debug)]
struct EncodeArgs {
    /// Write hex digits and a newline instead of raw bytes.
    #[arg(long)]
    hex: bool,
    /// The app's SHA-256 (64 hex digits).
    sha: String,
    /// The IPv4 address (dotted, or an integer 0-4294967295).
    ip: String,
}

#[derive(Args, Debug)]
struct DecodeArgs {
    /// Read hex digits (whitespace ignored) instead of raw bytes.
    #[arg(long)]
    hex: bool,
}

/// Bad input from the user: exit 2 rather than 1.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(message.into()))
}

fn percent(s: &str) -> Result<f64, String> {
    let value: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not a percentage between 0 and 100"))
    }
}

fn seconds(s: &str) -> Result<f64, String> {
    let value: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if value.is_finite() && value > 0.0 && value < 1e9 {
        Ok(value)
    } else {
        Err(format!("{value} is not a positive number of seconds"))
    }
}

fn parse_sha(s: &str) -> anyhow::Result<AppSha> {
    s.parse::<AppSha>()
        .map_err(|e| usage(format!("malformed SHA {s:?}: {e}")))
}

fn parse_ip(s: &str) -> anyhow::Result<u32> {
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(u32::from(ip));
    }
    s.parse::<u32>().map_err(|_| {
        usage(format!(
            "malformed IPv4 address {s:?}: expected a.b.c.d or an integer 0-4294967295"
        ))
    })
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => cmd_run(cli.run),
        Some(Cmd::Run(args)) => cmd_run(args),
        Some(Cmd::Send(args)) => cmd_send(args),
        Some(Cmd::Encode(args)) => cmd_encode(args),
        Some(Cmd::Decode(args)) => cmd_decode(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ipevent-test-client: error: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn cmd_run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let scenario = match (args.scenario, args.apps) {
        (ScenarioArg::Lookout, None) => Scenario::Lookout,
        (ScenarioArg::Lookout, Some(_)) => {
            return Err(usage("--apps applies to --scenario random only"))
        }
        (ScenarioArg::Random, None) => Scenario::Random {
            apps: DEFAULT_RANDOM_APPS,
        },
        (ScenarioArg::Random, Some(0)) => return Err(usage("--apps must be at least 1")),
        (ScenarioArg::Random, Some(apps)) => Scenario::Random { apps },
    };
    if args.verify_apps > MAX_VERIFY_APPS {
        return Err(usage(format!("--verify-apps is at most {MAX_VERIFY_APPS}")));
    }
    let limit = match (args.count, args.duration) {
        (Some(count), _) => Limit::Count(count),
        (None, Some(secs)) => Limit::Duration(Duration::from_secs_f64(secs)),
        (None, None) => Limit::Count(DEFAULT_COUNT),
    };
    let targets = send::resolve_targets(&args.to).map_err(|e| usage(format!("{e:#}")))?;
    let source = match (&args.api, &args.data_dir) {
        (Some(url), _) => Some(Source::Api {
            base: url.trim_end_matches('/').to_string(),
        }),
        (None, Some(dir)) => Some(Source::Query {
            bin: verify::find_query_bin(args.query_bin.as_deref())?,
            data_dir: dir.clone(),
        }),
        (None, None) => None,
    };
    if args.window > 0 && source.is_none() {
        return Err(usage(
            "--window needs --data-dir or --api: it waits on the receivers' counters",
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the first is being handled ends the process at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .context("installing signal handlers")?;
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let config = RunConfig {
        scenario,
        seed: args.seed.unwrap_or_else(rand::random),
        targets,
        corrupt_pct: args.corrupt_pct,
        valid_variant_pct: args.valid_variant_pct,
        rate_per_sec: args.rate,
        limit,
        batch: args.batch.map(usize::from),
        verify_apps: args.verify_apps,
        source,
        max_drop_pct: args.max_drop_pct,
        window: args.window,
        progress: !args.no_progress && std::io::stderr().is_terminal(),
        stop,
    };
    log::info!("seed {}", config.seed);
    let summary = run::run(&config)?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &summary).context("writing the summary")?;
        writeln!(stdout).context("writing the summary")?;
    } else {
        stdout
            .write_all(summary.human().as_bytes())
            .context("writing the summary")?;
    }
    stdout.flush().context("writing the summary")?;
    Ok(if summary.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn encode_event(sha: &str, ip: &str) -> anyhow::Result<Vec<u8>> {
    let event = IpEvent {
        app: parse_sha(sha)?,
        ip: parse_ip(ip)?,
    };
    Ok(wire::encode_to_vec(&event))
}

fn cmd_send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let app = match (&args.sha, &args.apk) {
        (Some(sha), _) => parse_sha(sha)?,
        (None, Some(path)) => {
            let app = apk::sha256_file(path).map_err(|e| usage(e.to_string()))?;
            eprintln!("ipevent-test-client: {} has SHA-256 {app}", path.display());
            app
        }
        (None, None) => {
            return Err(usage(
                "give the app's SHA-256 or --apk PATH before the address",
            ))
        }
    };
    let datagram = wire::encode_to_vec(&IpEvent {
        app,
        ip: parse_ip(&args.ip)?,
    });
    let targets = send::resolve_targets(std::slice::from_ref(&args.to))
        .map_err(|e| usage(format!("{e:#}")))?;
    let to = targets[0];
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket =
        UdpSocket::bind(bind).with_context(|| format!("binding a sending socket on {bind}"))?;
    let sent = socket
        .send_to(&datagram, to)
        .with_context(|| format!("sending to {to}"))?;
    if sent != datagram.len() {
        return Err(anyhow!(
            "sending to {to}: only {sent} of {} bytes went out",
            datagram.len()
        ));
    }
    log::info!("sent {sent} bytes to {to}");
    Ok(ExitCode::SUCCESS)
}

/// The datagram spelled by the hex on stdin (white space between digits allowed).
fn from_hex(text: &[u8]) -> anyhow::Result<Vec<u8>> {
    let digits: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    hex::decode(&digits).map_err(|e| {
        usage(match e {
            HexError::NotHex(c) => format!("stdin is not hex: {c:?}"),
            HexError::OddDigits(n) => format!("stdin holds {n} hex digits, an odd number"),
        })
    })
}

fn cmd_encode(args: EncodeArgs) -> anyhow::Result<ExitCode> {
    let datagram = encode_event(&args.sha, &args.ip)?;
    let mut stdout = std::io::stdout().lock();
    if args.hex {
        writeln!(stdout, "{}", hex::encode(&datagram)).context("writing to stdout")?;
    } else {
        stdout.write_all(&datagram).context("writing to stdout")?;
    }
    stdout.flush().context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_decode(args: DecodeArgs) -> anyhow::Result<ExitCode> {
    // Hex takes two digits and maybe whitespace per byte; read enough for any datagram
    // to be seen as oversize when it is.
    let limit = if args.hex {
        4 * DECODE_INPUT_MAX_BYTES
    } else {
        DECODE_INPUT_MAX_BYTES
    };
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .take(limit as u64)
        .read_to_end(&mut input)
        .context("reading stdin")?;
    let datagram = if args.hex { from_hex(&input)? } else { input };
    let (json, code) = match wire::decode(&datagram) {
        Ok(event) => (
            serde_json::json!({
                "app_sha256": event.app.to_hex(),
                "ip": Ipv4Addr::from(event.ip).to_string(),
            }),
            ExitCode::SUCCESS,
        ),
        Err(reason) => (
            serde_json::json!({ "error": reason.name() }),
            ExitCode::FAILURE,
        ),
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{json}").context("writing to stdout")?;
    stdout.flush().context("writing to stdout")?;
    Ok(code)
}
