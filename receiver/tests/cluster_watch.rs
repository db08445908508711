//! `watch` on a cluster's bucket (real SeaweedFS): two real receivers ship to one bucket,
//! `ipevent-query --store … watch` and `GET /watch` on an API with `--store` print the
//! transitions of the events either receiver took, each once, across a receiver's crash and
//! restart.
//!
//! Every event is delivered before anything is asserted (sent until the receiver's counters
//! show it accepted); the receivers flush only when asked (a sync), so which events share a
//! flush is fixed by the test, not by timing. Lines are awaited as they come.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipevent_core::control::{self, Command as Ctl};
use ipevent_core::wire::{self, IpEvent};
use ipevent_core::AppSha;
use ipevent_testkit::s3::S3Server;
use ipevent_testkit::{bin, sender, wait_for, Receiver, WAIT_LIMIT};
use serde_json::Value;

/// Flushes only when the test asks; ships and writes stats often.
const ARGS: [&str; 6] = [
    "--flush-interval-ms",
    "60000",
    "--ship-interval-ms",
    "100",
    "--stats-interval-ms",
    "20",
];

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ip(text: &str) -> u32 {
    u32::from(text.parse::<Ipv4Addr>().unwrap())
}

fn receiver(server: &S3Server, url: &str, dir: &Path, writer_id: &str, listen: &str) -> Receiver {
    let mut args = vec!["--store", url];
    args.extend_from_slice(&ARGS);
    Receiver::start_as(dir, writer_id, listen, &server.env(), &args)
}

fn accepted(rx: &Receiver) -> u64 {
    rx.stats().map_or(0, |s| s.events_accepted)
}

/// Sends one event per address to `rx`, each until its counters show it accepted (in the
/// journal, not flushed: a flush interval of a minute).
fn accept(rx: &Receiver, app: AppSha, addrs: &[&str]) {
    for addr in addrs {
        let datagram = wire::encode_to_vec(&IpEvent { app, ip: ip(addr) });
        let before = accepted(rx);
        let mut sent = false;
        for _ in 0..100 {
            sender().send_to(&datagram, rx.addr).unwrap();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(2) {
                if accepted(rx) > before {
                    sent = true;
                    break;
                }
                std::thread::park_timeout(Duration::from_millis(5));
            }
            if sent {
                break;
            }
        }
        assert!(sent, "{addr} never reached the receiver");
    }
}

/// Flushes what `rx` accepted as one flush (its shipper ships it within a ship interval).
fn flush(rx: &Receiver) {
    let socket = rx.data.control_socket(&rx.writer_id);
    match control::request(&socket, Ctl::Sync, WAIT_LIMIT).expect("sync") {
        control::Reply::Synced(_) => {}
        other => panic!("sync answered {other:?}"),
    }
}

/// Accepts the events and flushes them as one flush.
fn deliver(rx: &Receiver, app: AppSha, addrs: &[&str]) {
    accept(rx, app, addrs);
    flush(rx);
}

fn lines_of(pipe: impl std::io::Read + Send + 'static, data_only: bool) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let line = match (data_only, line.strip_prefix("data:")) {
                (false, _) => line,
                (true, Some(data)) => data.trim_start().to_string(),
                (true, None) => continue,
            };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `ipevent-query --store … watch`.
struct Watch {
    child: Child,
    stdout: mpsc::Receiver<String>,
}

impl Watch {
    fn start(server: &S3Server, url: &str) -> Watch {
        let mut cmd = Command::new(bin("ipevent-query"));
        server.apply_env(&mut cmd);
        let mut child = cmd
            .args(["--store", url, "watch"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ipevent-query watch");
        let stdout = lines_of(child.stdout.take().unwrap(), false);
        let stderr = lines_of(child.stderr.take().unwrap(), false);
        // Scripts and tests wait for this line: from here on every shipped flush is seen.
        let start = Instant::now();
        loop {
            let left = WAIT_LIMIT.saturating_sub(start.elapsed());
            let said = stderr
                .recv_timeout(left)
                .expect("the watch to say it is watching");
            if said.contains("watching") {
                assert!(said.contains(url), "{said}");
                break;
            }
        }
        Watch { child, stdout }
    }

    /// SIGTERM; the exit code and what was left on stdout.
    fn stop(mut self) -> (Option<i32>, Vec<String>) {
        let killed = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(killed.success());
        let status = self.child.wait().unwrap();
        (status.code(), self.stdout.iter().collect())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `ipevent-api --store`, and its `GET /watch` stream.
struct Api {
    child: Child,
    _ready: tempfile::TempDir,
}

impl Api {
    /// Starts the API and opens its watch stream (the stream is following once the
    /// response's headers are in).
    fn start_watching(
        server: &S3Server,
        url: &str,
        data_dir: &Path,
    ) -> (Api, mpsc::Receiver<String>) {
        let ready = tempfile::tempdir().unwrap();
        let ready_file = ready.path().join("ready");
        let mut cmd = Command::new(bin("ipevent-api"));
        server.apply_env(&mut cmd);
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0", "--store", url])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ready-file")
            .arg(&ready_file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning ipevent-api");
        let addr: std::net::SocketAddr = wait_for("the API's ready file", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("ipevent-api exited ({status}) before it was ready");
            }
            std::fs::read_to_string(&ready_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(WAIT_LIMIT)
            .build();
        let response = agent
            .get(&format!("http://{addr}/watch"))
            .call()
            .unwrap_or_else(|e| panic!("GET /watch: {e}"));
        assert_eq!(response.content_type(), "text/event-stream");
        let lines = lines_of(response.into_reader(), true);
        (
            Api {
                child,
                _ready: ready,
            },
            lines,
        )
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = wait_for("the API to exit", || self.child.try_wait().ok().flatten());
    }
}

/// The next line from both the CLI and the API: the same line, with `event`, `app_sha256`
/// and `ip` as expected.
fn expect_line(
    cli: &Watch,
    api: &mpsc::Receiver<String>,
    event: &str,
    app: AppSha,
    addr: &str,
) -> Value {
    let from_cli = cli
        .stdout
        .recv_timeout(WAIT_LIMIT)
        .unwrap_or_else(|_| panic!("no line from the CLI for {event} {addr}"));
    let from_api = api
        .recv_timeout(WAIT_LIMIT)
        .unwrap_or_else(|_| panic!("no event from GET /watch for {event} {addr}"));
    let line: Value = serde_json::from_str(&from_cli).unwrap_or_else(|e| panic!("{from_cli}: {e}"));
    assert_eq!(line["event"], event, "{from_cli}");
    assert_eq!(line["app_sha256"], app.to_hex(), "{from_cli}");
    assert_eq!(line["ip"], addr, "{from_cli}");
    assert_eq!(
        serde_json::from_str::<Value>(&from_api).unwrap(),
        line,
        "GET /watch and the CLI differ"
    );
    line
}

#[test]
fn watch_on_the_bucket_prints_every_receiver_s_transitions_once_across_a_crash() {
    let server = S3Server::start();
    let url = server.store_url("watch");
    let (dir_a, dir_b, dir_api) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0");
    let b = receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0");
    let (x, y) = (AppSha([0x11; 32]), AppSha([0x22; 32]));
    // Before the watch: each app's good hosts, through different receivers.
    deliver(&a, x, &["10.0.0.1", "10.0.0.2"]);
    deliver(&b, y, &["10.9.9.1", "10.9.9.2"]);
    // Shipped and visible before the watches start, so they are old news.
    let synced = ipevent_store_s3::Bucket::from_vars(url.parse().unwrap(), |name| {
        server
            .env()
            .into_iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })
    .unwrap()
    .sync_all(WAIT_LIMIT)
    .unwrap();
    assert!(synced.missing.is_empty(), "{synced:?}");
    // Both watches start in a later second than those events arrived, so both count them
    // as before their start alike.
    let arrived = unix_now();
    wait_for("the next second", || (unix_now() > arrived).then_some(()));

    let cli = Watch::start(&server, &url);
    let (api, stream) = Api::start_watching(&server, &url, dir_api.path());

    // A bad address through each receiver.
    deliver(&a, x, &["8.8.8.8"]);
    let line = expect_line(&cli, &stream, "bad_address", x, "8.8.8.8");
    assert_eq!(line["netblock"], "10.0.0.0/28");
    deliver(&b, y, &["9.9.9.9"]);
    let line = expect_line(&cli, &stream, "bad_address", y, "9.9.9.9");
    assert_eq!(line["netblock"], "10.9.9.0/28");

    // Three hosts of another /28 through the other receiver, in one flush: the netblock
    // moves and x's old hosts turn bad.
    deliver(&b, x, &["192.168.1.1", "192.168.1.2", "192.168.1.3"]);
    for old in ["10.0.0.1", "10.0.0.2"] {
        let line = expect_line(&cli, &stream, "netblock_changed", x, old);
        assert_eq!(line["netblock"], "192.168.1.0/28");
        assert_eq!(line["previous_netblock"], "10.0.0.0/28");
    }

    // A crash of receiver a with an event only in its journal: its restart replays and
    // ships it once; then a's next flush, then b's.
    accept(&a, x, &["5.5.5.5"]);
    let mut a = a;
    a.stop_with(libc::SIGKILL);
    let a = receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0");
    deliver(&a, x, &["6.6.6.6"]);
    expect_line(&cli, &stream, "bad_address", x, "5.5.5.5");
    expect_line(&cli, &stream, "bad_address", x, "6.6.6.6");
    // Known addresses print nothing: the next line is the next new one.
    deliver(&a, x, &["8.8.8.8", "5.5.5.5"]);
    deliver(&b, y, &["9.9.9.9", "4.4.4.4"]);
    expect_line(&cli, &stream, "bad_address", y, "4.4.4.4");

    drop(api);
    let (code, rest) = cli.stop();
    assert_eq!(code, Some(0));
    assert!(
        rest.is_empty(),
        "lines printed twice or unexpected: {rest:?}"
    );
    drop(b);
    drop(a);
}
