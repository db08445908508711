//! A run sends exactly the datagrams its summary claims, and the same seed sends the same
//! datagrams: counted and hashed at a plain UDP socket the test binds itself.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{client, describe, nonzero};
use ipevent_core::wire::{self, Reject};
use ipevent_testkit::stdout_json;
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

/// Sent by the test after the client has exited: everything before it came from the client.
const END_MARKER: &[u8] = b"end of the test client's traffic: no IpEvent looks like this";

/// A receive buffer big enough for the whole run even if the reading thread falls behind.
const SINK_RCVBUF_BYTES: usize = 4 << 20;

/// Longest wait for one datagram before the test fails.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

struct Sink {
    addr: SocketAddr,
    reader: JoinHandle<Vec<Vec<u8>>>,
}

/// Binds 127.0.0.1:0 and reads every datagram until the end marker, then checks that
/// nothing else is queued.
fn sink() -> Sink {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    socket.set_recv_buffer_size(SINK_RCVBUF_BYTES).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let addr = socket.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e) => panic!("no end marker after {} datagrams: {e}", got.len()),
            };
            if &buf[..n] == END_MARKER {
                break;
            }
            got.push(buf[..n].to_vec());
        }
        socket.set_nonblocking(true).unwrap();
        match socket.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("a datagram arrived after the end marker: {other:?}"),
        }
        got
    });
    Sink { addr, reader }
}

/// Runs the client at a fresh sink and returns its summary and what arrived.
fn run_to_sink(args: &[&str]) -> (Value, Vec<Vec<u8>>) {
    let sink = sink();
    let to = sink.addr.to_string();
    let mut all = vec!["run", "--to", &to, "--json", "--no-progress"];
    all.extend_from_slice(args);
    let output = client(&all);
    // The client has exited, so all its datagrams are queued ahead of the marker.
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(END_MARKER, sink.addr)
        .unwrap();
    let got = sink.reader.join().expect("the sink thread");
    assert!(output.status.success(), "{}", describe(&output));
    (stdout_json(&output), got)
}

fn digest(datagrams: &[Vec<u8>]) -> u64 {
    let mut hasher = DefaultHasher::new();
    datagrams.hash(&mut hasher);
    hasher.finish()
}

#[test]
fn a_run_sends_exactly_what_its_summary_claims() {
    let args = [
        "--count",
        "6000",
        "--rate",
        "20000",
        "--seed",
        "1234",
        "--corrupt-pct",
        "35",
    ];
    let (summary, got) = run_to_sink(&args);
    assert_eq!(summary["sent"], 6000);
    assert_eq!(got.len(), 6000);
    assert_eq!(
        summary["bytes"].as_u64().unwrap(),
        got.iter().map(|d| d.len() as u64).sum::<u64>()
    );
    assert_eq!(summary["verification"], Value::Null);
    assert_eq!(summary["ok"], true);

    // Decode what arrived and compare with what the summary says was sent.
    let mut valid = 0u64;
    let mut rejects = std::collections::BTreeMap::new();
    for datagram in &got {
        match wire::decode(datagram) {
            Ok(_) => valid += 1,
            Err(reason) => *rejects.entry(reason.name().to_string()).or_insert(0u64) += 1,
        }
    }
    assert_eq!(summary["valid"].as_u64().unwrap(), valid);
    assert_eq!(summary["corrupted"].as_u64().unwrap(), 6000 - valid);
    assert_eq!(nonzero(&summary["rejected_by_reason"]), rejects);
    let by_kind = nonzero(&summary["corrupted_by_kind"]);
    assert_eq!(by_kind.values().sum::<u64>(), 6000 - valid);
    assert_eq!(by_kind.len(), 8, "{by_kind:?}");
    assert_eq!(
        rejects.get(Reject::Empty.name()).copied(),
        by_kind.get("empty").copied()
    );
    assert_eq!(
        rejects.get(Reject::Oversize.name()).copied(),
        by_kind.get("oversize").copied()
    );

    // The valid share of the stream is what the three lookout apps were sent.
    let per_app: u64 = summary["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["count"].as_u64().unwrap())
        .sum();
    assert_eq!(per_app, valid);
}

#[test]
fn the_same_seed_sends_the_same_datagrams() {
    let args = [
        "--count", "3000", "--rate", "20000", "--seed", "99", "--batch", "7",
    ];
    let (first_summary, first) = run_to_sink(&args);
    let (second_summary, second) = run_to_sink(&args);
    assert_eq!(first.len(), 3000);
    assert_eq!(digest(&first), digest(&second));
    assert_eq!(first_summary["apps"], second_summary["apps"]);
    assert_eq!(
        first_summary["rejected_by_reason"],
        second_summary["rejected_by_reason"]
    );

    // Batching does not change the stream; another seed does.
    let (_, rebatched) = run_to_sink(&[
        "--count", "3000", "--rate", "20000", "--seed", "99", "--batch", "64",
    ]);
    assert_eq!(digest(&first), digest(&rebatched));
    let (_, other) = run_to_sink(&[
        "--count", "3000", "--rate", "20000", "--seed", "100", "--batch", "7",
    ]);
    assert_ne!(digest(&first), digest(&other));
}

#[test]
fn a_name_with_several_targets_gets_batches_round_robin() {
    // Two sinks given as two --to flags: batches alternate, and together they hold the run.
    let a = sink();
    let b = sink();
    let (to_a, to_b) = (a.addr.to_string(), b.addr.to_string());
    let output = client(&[
        "--to",
        &to_a,
        "--to",
        &to_b,
        "--json",
        "--no-progress",
        "--count",
        "1000",
        "--batch",
        "10",
        "--rate",
        "20000",
        "--seed",
        "3",
    ]);
    for addr in [a.addr, b.addr] {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(END_MARKER, addr)
            .unwrap();
    }
    let (got_a, got_b) = (a.reader.join().unwrap(), b.reader.join().unwrap());
    assert!(output.status.success(), "{}", describe(&output));
    let summary = stdout_json(&output);
    assert_eq!(summary["targets"], serde_json::json!([to_a, to_b]));
    assert_eq!((got_a.len(), got_b.len()), (500, 500));
    let (_, alone) = run_to_sink(&[
        "--count", "1000", "--batch", "10", "--rate", "20000", "--seed", "3",
    ]);
    let interleaved: Vec<Vec<u8>> = got_a
        .chunks(10)
        .zip(got_b.chunks(10))
        .flat_map(|(x, y)| x.iter().chain(y).cloned())
        .collect();
    assert_eq!(interleaved, alone);
}
