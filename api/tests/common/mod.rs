//! Shared by the API's end-to-end tests: real HTTP through a small blocking client on the
//! real `ipevent-api` child process that `ipevent_testkit::Api` runs, and helpers to build and
//! send datagrams.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use ipevent_core::wire::{self, AppSha, IpEvent};

/// Longest any single HTTP exchange in a test may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(120);

#[allow(unused_imports)]
pub use ipevent_testkit::{clear_ipevent_env, Api};

/// The HTTP calls the tests make on a running API.
pub trait ApiHttp {
    /// `GET path` with `Accept: application/json`.
    fn get(&self, path: &str) -> Reply;
    /// The report of `app` (asserting a 200 with a synced read) as a string.
    fn report(&self, app: &AppSha) -> String;
    /// `DELETE /events` from loopback, asserting success.
    fn reset(&self) -> serde_json::Value;
    /// `POST /events` with `body` as `application/octet-stream`.
    fn post(&self, body: &[u8]) -> Reply;
    /// The `/metrics` text.
    fn metrics(&self) -> String;
}

impl ApiHttp for Api {
    fn get(&self, path: &str) -> Reply {
        http(
            "GET",
            &self.url(path),
            &[("Accept", "application/json")],
            None,
        )
    }

    fn report(&self, app: &AppSha) -> String {
        let reply = self.get(&format!("/events/{app}"));
        assert_eq!(reply.status, 200, "GET /events/{app}: {reply:?}");
        reply.body
    }

    fn reset(&self) -> serde_json::Value {
        let reply = http("DELETE", &self.url("/events"), &[], None);
        assert_eq!(reply.status, 200, "DELETE /events: {reply:?}");
        reply.json()
    }

    fn post(&self, body: &[u8]) -> Reply {
        http(
            "POST",
            &self.url("/events"),
            &[("Content-Type", "application/octet-stream")],
            Some(body),
        )
    }

    fn metrics(&self) -> String {
        let reply = http("GET", &self.url("/metrics"), &[], None);
        assert_eq!(reply.status, 200, "GET /metrics: {reply:?}");
        reply.body
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

impl Reply {
    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, failing the test when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }

    /// The `error` field of a JSON error body.
    pub fn error(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {self:?}"))
            .to_string()
    }
}

/// One HTTP exchange; any status is an answer, only a transport failure fails the test.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
    let agent = ureq::AgentBuilder::new().timeout(HTTP_TIMEOUT).build();
    let mut request = agent.request(method, url);
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let result = match body {
        Some(body) => request.send_bytes(body),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .map(|name| {
            let value = response.header(&name).unwrap_or_default().to_string();
            (name.to_ascii_lowercase(), value)
        })
        .collect();
    let body = response.into_string().expect("reading the body");
    Reply {
        status,
        headers,
        body,
    }
}

/// A request written by hand, for what the client library always adds (an `Accept` header):
/// returns the status line and the whole answer.
pub fn raw_request(addr: SocketAddr, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
    stream
        .write_all(request.as_bytes())
        .expect("writing the request");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("reading the answer");
    let status_line = answer.lines().next().unwrap_or_default().to_string();
    (status_line, answer)
}

/// An app SHA made of one repeated byte.
pub fn app(byte: u8) -> AppSha {
    AppSha([byte; 32])
}

/// The datagram for `(app, ip)`.
pub fn datagram(app: &AppSha, ip: &str) -> Vec<u8> {
    let ip: Ipv4Addr = ip.parse().expect("dotted quad");
    wire::encode_to_vec(&IpEvent {
        app: *app,
        ip: u32::from(ip),
    })
}

/// Sends one datagram per `(app, ip)` to `to`.
pub fn send_events(socket: &UdpSocket, to: SocketAddr, events: &[(AppSha, &str)]) {
    for (app, ip) in events {
        socket
            .send_to(&datagram(app, ip), to)
            .expect("sending a datagram");
    }
}

/// The report JSON contract 2 fixes, for comparing as text.
pub fn report_json(count: u64, good: &[&str], bad: &[&str]) -> String {
    let list = |ips: &[&str]| serde_json::to_string(ips).unwrap();
    format!(
        "{{\"count\":{count},\"good_ips\":{},\"bad_ips\":{}}}",
        list(good),
        list(bad)
    )
}

/// The value of the sample `line_prefix` (name and labels) in a metrics text.
pub fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(line_prefix)?
            .strip_prefix(' ')?
            .parse()
            .ok()
    })
}

/// One datagram of the shared contract-1 vectors.
pub use ipevent_core::testdata::WireVector as Vector;

/// Every vector of `testdata/ipevent.json`.
pub fn vectors() -> Vec<Vector> {
    ipevent_core::testdata::wire_vectors().expect("reading testdata/ipevent.json")
}
