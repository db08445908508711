//! Helpers for end-to-end tests: locate the workspace's real binaries, run a real receiver in a
//! temporary data dir and a real API, and wait on readiness (files that appear, counters that
//! arrive), never on fixed sleeps.

#![forbid(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use ipevent_core::stats::ReceiverStats;
use ipevent_core::wire::{self, IpEvent};
use ipevent_core::{AppSha, DataDir};

mod paced;
pub mod s3;

pub use paced::{window_datagrams, PacedSender};

/// How long any wait in a test may take before the test fails with what it was waiting for.
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// Path of one of the workspace's binaries (`ipevent-receiver`, `ipevent-query`, ...), built
/// next to the test executable by `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or nextest) so every binary is built",
        path.display()
    );
    path
}

/// Polls `check` until it returns `Some`, failing the test with `what` after [`WAIT_LIMIT`].
/// Between polls it yields briefly; the wait ends as soon as the condition holds.
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < WAIT_LIMIT,
            "timed out after {WAIT_LIMIT:?} waiting for {what}"
        );
        std::thread::park_timeout(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// A real `ipevent-receiver` child process on 127.0.0.1 with a port chosen by the kernel.
pub struct Receiver {
    child: Option<Child>,
    /// Its data dir.
    pub data: DataDir,
    /// Its writer id.
    pub writer_id: String,
    /// The UDP address it listens on.
    pub addr: SocketAddr,
    _tmp: Option<tempfile::TempDir>,
}

impl Receiver {
    /// Starts a receiver in a fresh temporary data dir, with `extra` flags.
    pub fn start(extra: &[&str]) -> Receiver {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut receiver = Receiver::start_in(tmp.path(), extra);
        receiver._tmp = Some(tmp);
        receiver
    }

    /// Starts a receiver on `data_dir` (which it creates if needed), with `extra` flags.
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Receiver {
        Receiver::start_as(data_dir, "test", "127.0.0.1:0", &[], extra)
    }

    /// Starts a receiver on `data_dir` as `writer_id`, listening on `listen`, with `env` set
    /// (for example an S3 server's [`s3::S3Server::env`]) and `extra` flags.
    pub fn start_as(
        data_dir: &Path,
        writer_id: &str,
        listen: &str,
        env: &[(&str, String)],
        extra: &[&str],
    ) -> Receiver {
        let writer_id = writer_id.to_string();
        let data = DataDir::new(data_dir);
        // A stats file from an earlier run in the same dir must not pass for readiness.
        let _ = std::fs::remove_file(data.stats_path(&writer_id));
        let child = receiver_command_as(data_dir, &writer_id, listen)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "info")
            .spawn()
            .expect("spawning ipevent-receiver");
        let mut receiver = Receiver {
            child: Some(child),
            data,
            writer_id,
            addr: "127.0.0.1:0".parse().unwrap(),
            _tmp: None,
        };
        let pid = receiver.pid();
        let stats = receiver.wait_stats("the receiver to start", |s| s.pid == pid);
        receiver.addr = stats.listen[0].parse().expect("listen address in stats");
        receiver
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The latest stats snapshot, if one is there.
    pub fn stats(&self) -> Option<ReceiverStats> {
        ReceiverStats::read(&self.data, &self.writer_id).ok()
    }

    /// Waits until the stats file satisfies `pred`; fails if the receiver exits first.
    pub fn wait_stats(
        &mut self,
        what: &str,
        pred: impl Fn(&ReceiverStats) -> bool,
    ) -> ReceiverStats {
        wait_for(what, || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("the receiver exited ({status}) while waiting for {what}");
                }
            }
            self.stats().filter(|s| pred(s))
        })
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) and waits for the exit.
    pub fn stop_with(&mut self, signal: i32) -> ExitStatus {
        signal_and_wait(self.child.take().expect("running"), &signal.to_string())
    }

    /// Waits for the receiver to exit by itself (a crash hook, a fatal error).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_for("the receiver to exit", || {
            child.try_wait().expect("waiting for the receiver")
        })
    }

    /// SIGTERM, then asserts a clean exit.
    pub fn stop(&mut self) {
        let status = self.stop_with(libc::SIGTERM);
        assert!(status.success(), "receiver exited with {status} on SIGTERM");
    }

    /// Runs `ipevent-query` on this receiver's data dir.
    pub fn query(&self, args: &[&str]) -> Output {
        query(self.data.root(), args)
    }

    /// Events of every app together, as `ipevent-query list` reads them from the store (no
    /// sync); fails the test when the query does.
    pub fn stored_total(&self) -> u64 {
        let out = self.query(&["list", "--limit", "0"]);
        assert!(
            out.status.success(),
            "ipevent-query list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout_json(&out)
            .as_array()
            .expect("a list of apps")
            .iter()
            .map(|app| app["count"].as_u64().expect("a count per app"))
            .sum()
    }

    /// Keeps the temporary data dir after the receiver is gone (for a restart in it).
    pub fn take_tmp(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` (a number or a name such as `TERM`) to `child` and waits for its exit;
/// kills it and fails the test when it outlives [`WAIT_LIMIT`].
fn signal_and_wait(mut child: Child, signal: &str) -> ExitStatus {
    let name = child_name(&child);
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill failed");
    let start = Instant::now();
    loop {
        if let Some(exit) = child.try_wait().expect("waiting for a child") {
            return exit;
        }
        if start.elapsed() > WAIT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} did not exit within {WAIT_LIMIT:?} of signal {signal}");
        }
        std::thread::park_timeout(Duration::from_millis(2));
    }
}

/// Waits for `child` (spawned with piped stdout and stderr) to exit by itself and returns its
/// output, read while it runs; kills it and fails the test, with its stderr, when it
/// outlives [`WAIT_LIMIT`].
pub fn output_at_exit(child: Child) -> Output {
    let name = child_name(&child);
    let pid = child.id();
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match output.recv_timeout(WAIT_LIMIT) {
        Ok(out) => out.expect("collecting a child's output"),
        Err(_) => {
            // The child is not reaped before the thread's wait returns: the pid is still its.
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            let stderr = output
                .recv()
                .ok()
                .and_then(Result::ok)
                .map(|out| String::from_utf8_lossy(&out.stderr).into_owned())
                .unwrap_or_default();
            panic!("{name} kept running past {WAIT_LIMIT:?}; stderr: {stderr}");
        }
    }
}

fn child_name(child: &Child) -> String {
    std::fs::read_to_string(format!("/proc/{}/comm", child.id()))
        .map(|comm| comm.trim().to_string())
        .unwrap_or_else(|_| format!("process {}", child.id()))
}

/// A real `ipevent-api` child process with a port chosen by the kernel, found through its
/// ready file. Settings from the environment of whoever runs the tests are cleared.
pub struct Api {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    _ready_dir: tempfile::TempDir,
}

impl Api {
    /// Starts the API on 127.0.0.1 and `data_dir` with `extra` flags and waits for its
    /// ready file.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Api {
        Api::start_on("127.0.0.1:0", data_dir, extra)
    }

    /// [`Api::start`] listening on `listen`.
    pub fn start_on(listen: &str, data_dir: &Path, extra: &[&str]) -> Api {
        Api::start_command(Command::new(bin("ipevent-api")), listen, data_dir, extra)
    }

    /// [`Api::start`] through a wrapper that then runs the API, e.g.
    /// `prlimit --nofile=1024:1024 --`.
    pub fn start_wrapped(wrapper: &[&str], data_dir: &Path, extra: &[&str]) -> Api {
        let mut command = Command::new(wrapper[0]);
        command.args(&wrapper[1..]).arg(bin("ipevent-api"));
        Api::start_command(command, "127.0.0.1:0", data_dir, extra)
    }

    fn start_command(mut command: Command, listen: &str, data_dir: &Path, extra: &[&str]) -> Api {
        let ready_dir = tempfile::tempdir().expect("temp dir");
        let ready = ready_dir.path().join("ready");
        command
            .args(["--listen", listen])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        clear_ipevent_env(&mut command);
        let mut child = command.spawn().expect("spawning ipevent-api");
        let addr = wait_for("the API's ready file", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("ipevent-api exited ({status}) before it was ready");
            }
            std::fs::read_to_string(&ready)
                .ok()?
                .trim()
                .parse::<SocketAddr>()
                .ok()
        });
        Api {
            child: Some(child),
            addr,
            _ready_dir: ready_dir,
        }
    }

    /// `http://ADDR/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with("TERM")
    }

    /// Sends `signal` (`TERM`, `INT`, ...) and waits for the exit.
    pub fn stop_with(&mut self, signal: &str) -> ExitStatus {
        signal_and_wait(self.child.take().expect("running"), signal)
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Settings from the environment of whoever runs the tests must not change a child's.
pub fn clear_ipevent_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("IPEVENT_") {
            command.env_remove(key);
        }
    }
}

/// A command that runs `ipevent-receiver` as writer `test` on `data_dir`, listening on
/// 127.0.0.1 at a port the kernel chooses, with no stdin.
pub fn receiver_command(data_dir: &Path) -> Command {
    receiver_command_as(data_dir, "test", "127.0.0.1:0")
}

/// [`receiver_command`] as `writer_id`, listening on `listen`.
fn receiver_command_as(data_dir: &Path, writer_id: &str, listen: &str) -> Command {
    let mut command = Command::new(bin("ipevent-receiver"));
    command
        .args(["--listen", listen, "--writer-id", writer_id, "--allow-root"])
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null());
    command
}

/// Runs a receiver on `data_dir` with `extra` flags until it exits by itself (a crash hook or
/// a fatal error) and returns how it ended; fails the test when it keeps running past
/// [`WAIT_LIMIT`].
pub fn run_receiver_to_exit(data_dir: &Path, extra: &[&str]) -> Output {
    let child = receiver_command(data_dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning ipevent-receiver");
    output_at_exit(child)
}

/// Sends one `IpEvent` of `app` to `to` from `tx` for each address of `ips`.
pub fn send_events(
    tx: &UdpSocket,
    to: SocketAddr,
    app: &AppSha,
    ips: impl IntoIterator<Item = u32>,
) {
    for ip in ips {
        tx.send_to(&wire::encode_to_vec(&IpEvent { app: *app, ip }), to)
            .expect("sending");
    }
}

/// The `count` of the report a successful `ipevent-query` printed; fails the test with its
/// stderr when the query failed.
pub fn report_count(output: &Output) -> u64 {
    assert!(
        output.status.success(),
        "ipevent-query failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout_json(output)["count"]
        .as_u64()
        .expect("a count in the report")
}

/// Runs `ipevent-query --data-dir <dir> <args>` and returns its output.
pub fn query(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("ipevent-query"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .expect("running ipevent-query")
}

/// A UDP socket for sending test datagrams from 127.0.0.1.
pub fn sender() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("binding a sender")
}

/// Parses a command's stdout as JSON, failing with its stderr when it is not.
pub fn stdout_json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}); status {}; stdout {:?}; stderr {:?}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// A small deterministic generator (xorshift64*), so a failing test can be replayed.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A random app SHA.
    pub fn app(&mut self) -> AppSha {
        let mut bytes = [0u8; 32];
        for chunk in bytes.chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        AppSha(bytes)
    }
}
