//! `GET /watch`: the watch lines as server-sent events over real HTTP, from events the API
//! itself took (`POST /events` answers once they are in the store).

mod common;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;

use common::{app, datagram, Api, ApiHttp, HTTP_TIMEOUT};
use serde_json::Value;

/// An open event stream: its `data:` lines, as they come.
struct Stream {
    lines: mpsc::Receiver<String>,
}

impl Stream {
    /// `GET /watch…`; returns the status, the content type and, for a 200, the stream.
    fn open(api: &Api, path: &str) -> (u16, String, Option<Stream>) {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(HTTP_TIMEOUT)
            .build();
        let response = match agent.get(&api.url(path)).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(e) => panic!("GET {path}: {e}"),
        };
        let status = response.status();
        let content_type = response.content_type().to_string();
        if status != 200 {
            return (status, content_type, None);
        }
        let (tx, lines) = mpsc::channel();
        let reader = BufReader::new(response.into_reader());
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(data) = line.strip_prefix("data:") {
                    if tx.send(data.trim_start().to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        (status, content_type, Some(Stream { lines }))
    }

    fn next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(HTTP_TIMEOUT)
            .expect("an event from the stream");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }
}

#[test]
fn watch_streams_lines_as_events_within_its_own_cap_and_ends_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut api = Api::start(data.path(), &["--max-watch-streams", "1"]);
    let a = app(0x51);
    assert_eq!(api.post(&datagram(&a, "10.0.0.1")).status, 202);

    let (status, content_type, stream) = Stream::open(&api, "/watch");
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/event-stream");
    let stream = stream.unwrap();
    assert_eq!(api.post(&datagram(&a, "10.0.0.2")).status, 202);
    assert_eq!(api.post(&datagram(&a, "8.8.8.8")).status, 202);
    let line = stream.next();
    assert_eq!(line["event"], "bad_address", "{line}");
    assert_eq!(line["app_sha256"], a.to_hex());
    assert_eq!(line["ip"], "8.8.8.8");
    assert_eq!(line["count"], 1);
    assert_eq!(line["netblock"], "10.0.0.0/28");

    // The cap is the streams', not the connections': a second stream is refused, ordinary
    // requests are served.
    let (status, _, _) = Stream::open(&api, "/watch");
    assert_eq!(status, 503);
    assert_eq!(api.get("/").status, 200);
    assert_eq!(api.post(&datagram(&a, "8.8.8.8")).status, 202);
    assert_eq!(api.post(&datagram(&a, "9.9.9.9")).status, 202);
    assert_eq!(stream.next()["ip"], "9.9.9.9");

    // A stop ends the stream (the client sees its end) and the API exits 0.
    let status = api.stop();
    assert!(status.success(), "{status}");
    assert!(stream.lines.recv_timeout(HTTP_TIMEOUT).is_err());
}

#[test]
fn watch_since_serves_the_backlog_and_a_bad_since_is_400() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);
    let a = app(0x52);
    for ip in ["10.0.0.1", "10.0.0.2", "7.7.7.7"] {
        assert_eq!(api.post(&datagram(&a, ip)).status, 202);
    }
    let (status, _, stream) = Stream::open(&api, "/watch?since=1h");
    assert_eq!(status, 200);
    assert_eq!(stream.unwrap().next()["ip"], "7.7.7.7");

    for bad in [
        "/watch?since=yesterday",
        "/watch?since=2001-13-01T00:00:00Z",
    ] {
        let reply = api.get(bad);
        assert_eq!(reply.status, 400, "{bad}: {reply:?}");
        assert!(reply.error().contains("not a time"), "{reply:?}");
    }
}
