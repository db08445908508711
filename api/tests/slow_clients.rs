//! Slow and idle HTTP clients cannot starve the API: thousands of connections that trickle a
//! header line now and then (a slowloris) while `/healthz` and `GET /events/{sha}` must keep
//! answering. Bounded in count and time, on 127.0.0.1 only.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{app, datagram, metric, report_json, Api, ApiHttp};
use ipevent_testkit::wait_for;

/// Trickling connections kept open (re-opened as the API closes them).
const TRICKLERS: usize = 3000;
/// Open files the API gets when `prlimit` is there: fewer than [`TRICKLERS`], so that
/// without a connection cap the API runs out of descriptors.
const API_OPEN_FILES: &str = "--nofile=1024:1024";
/// Rounds of checks while the clients trickle.
const CHECKS: usize = 10;
/// A check may retry a refused or reset connection, as any client does, for this long; only
/// real starvation takes longer.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

#[test]
fn thousands_of_trickling_clients_leave_healthz_and_reads_answering() {
    // This test holds thousands of sockets itself.
    let open_files = ipevent_core::sys::raise_open_files_limit().unwrap();
    assert!(
        open_files as usize > TRICKLERS + 256,
        "the open-files hard limit ({open_files}) is too low for this test"
    );
    let data = tempfile::tempdir().unwrap();
    let limits = ["--header-timeout-ms", "2000"];
    let api = if on_path("prlimit") {
        // The cap then comes from the open-files limit, as in production.
        Api::start_wrapped(&["prlimit", API_OPEN_FILES, "--"], data.path(), &limits)
    } else {
        let mut flags = limits.to_vec();
        flags.extend(["--max-connections", "512"]);
        Api::start(data.path(), &flags)
    };
    let sha = app(0x5d);
    assert_eq!(api.post(&datagram(&sha, "10.0.0.1")).status, 202);

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let trickler = {
        let (stop, opened, addr) = (stop.clone(), opened.clone(), api.addr);
        std::thread::spawn(move || trickle(addr, &stop, &opened))
    };
    wait_for("thousands of trickling connections", || {
        (opened.load(Ordering::Relaxed) >= TRICKLERS).then_some(())
    });

    for _ in 0..CHECKS {
        let (status, body) = answered(&api.url("/healthz"));
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        let (status, body) = answered(&api.url(&format!("/events/{sha}")));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, report_json(1, &["10.0.0.1"], &[]));
    }
    stop.store(true, Ordering::Relaxed);
    let peak = trickler.join().unwrap();

    let metrics = api.metrics();
    let shed = metric(&metrics, "ipevent_api_connections_shed_total").unwrap();
    eprintln!(
        "{} trickling connections opened, at most {peak} open at once; {shed} shed",
        opened.load(Ordering::Relaxed)
    );
    assert!(shed > 0.0, "{metrics}");
}

/// GET `url` until it is answered, retrying connections the API refused or reset to make
/// room; fails the test after [`ANSWER_WITHIN`].
fn answered(url: &str) -> (u16, String) {
    let agent = ureq::AgentBuilder::new().timeout(ANSWER_WITHIN).build();
    let start = Instant::now();
    loop {
        match agent.get(url).set("Accept", "application/json").call() {
            Ok(response) => {
                let status = response.status();
                return (status, response.into_string().unwrap());
            }
            Err(ureq::Error::Status(status, response)) => {
                return (status, response.into_string().unwrap_or_default())
            }
            Err(e) => assert!(
                start.elapsed() < ANSWER_WITHIN,
                "GET {url} not answered within {ANSWER_WITHIN:?}: {e}"
            ),
        }
    }
}

/// Keeps [`TRICKLERS`] connections open, each sending one more header line per round and
/// never finishing its request; re-opens those the API closed. Returns the most that were
/// open at once.
fn trickle(addr: SocketAddr, stop: &AtomicBool, opened: &AtomicUsize) -> usize {
    let mut conns: Vec<TcpStream> = Vec::with_capacity(TRICKLERS);
    let mut peak = 0;
    while !stop.load(Ordering::Relaxed) {
        while conns.len() < TRICKLERS && !stop.load(Ordering::Relaxed) {
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            else {
                break;
            };
            stream.set_nonblocking(true).unwrap();
            if stream.write_all(b"GET /healthz HTTP/1.1\r\n").is_ok() {
                conns.push(stream);
                opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        peak = peak.max(conns.len());
        // One more header line each; a connection the API closed fails here and is dropped.
        conns.retain_mut(|stream| stream.write_all(b"X-Trickle: 1\r\n").is_ok());
        // Pacing of the attack, not a wait for anything.
        std::thread::park_timeout(Duration::from_millis(200));
    }
    peak
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}
