//! `ipevent-query --store s3://… ip` over two real receivers shipping to a real S3 server
//! (SeaweedFS): the bucket's address index answers exactly what the receivers' local trees
//! hold together, read app by app.
//!
//! Exactness never rests on UDP arriving: the expected answer is computed from the local
//! trees (each exact under crashes by its journal), not from what was sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use ipevent_core::control::{self, Command as Ctl};
use ipevent_core::lookup::{apps_by_address, Cidr};
use ipevent_core::stats::ReceiverStats;
use ipevent_core::store::{self, AppCount, AppData, DataDir, Store, StoreError};
use ipevent_core::{AddrStats, AppSha};
use ipevent_testkit::s3::S3Server;
use ipevent_testkit::{bin, stdout_json, wait_for, Receiver};
use serde_json::Value;

const FAST: [&str; 6] = [
    "--flush-interval-ms",
    "200",
    "--ship-interval-ms",
    "100",
    "--stats-interval-ms",
    "50",
];

const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// The receivers' local trees together, read without any index: every app listed and read.
struct LocalTrees(Vec<DataDir>);

impl Store for LocalTrees {
    fn read_app(&self, app: &AppSha) -> Result<Option<AppData>, StoreError> {
        let mut merged: BTreeMap<u32, AddrStats> = BTreeMap::new();
        let mut any = false;
        for data in &self.0 {
            if let Some(read) = store::read_app(data, app)? {
                any = true;
                for (ip, stats) in read.addrs {
                    merged.entry(ip).or_default().merge(&stats);
                }
            }
        }
        Ok(any.then(|| AppData {
            addrs: merged.into_iter().collect(),
            ..AppData::default()
        }))
    }

    fn list_apps(&self) -> Result<Vec<AppCount>, StoreError> {
        let mut totals: BTreeMap<AppSha, u64> = BTreeMap::new();
        for data in &self.0 {
            for app in store::list_apps(data)? {
                *totals.entry(app.app).or_default() += app.count;
            }
        }
        Ok(totals
            .into_iter()
            .map(|(app, count)| AppCount::new(app, count))
            .collect())
    }
}

fn receiver(server: &S3Server, url: &str, dir: &Path, writer_id: &str, listen: &str) -> Receiver {
    let mut args = vec!["--store", url];
    args.extend_from_slice(&FAST);
    Receiver::start_as(dir, writer_id, listen, &server.env(), &args)
}

/// Drains and flushes `receiver`, then waits until that flush is shipped and published.
fn sync_shipped(receiver: &mut Receiver) -> ReceiverStats {
    let socket = receiver.data.control_socket(&receiver.writer_id);
    let epoch = match control::request(&socket, Ctl::Sync, CONTROL_TIMEOUT).expect("sync") {
        control::Reply::Synced(synced) => synced.epoch,
        other => panic!("sync answered {other:?}"),
    };
    receiver.wait_stats("the sync's flush shipped and published", |s| {
        s.epoch >= epoch
            && s.events_pending == 0
            && s.ship_lag_epochs == 0
            && s.published_epoch == s.shipped_epoch
    })
}

fn query_store(server: &S3Server, url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("ipevent-query"));
    server.apply_env(&mut cmd);
    cmd.arg("--store")
        .arg(url)
        .args(args)
        .output()
        .expect("running ipevent-query")
}

#[test]
fn ip_through_the_bucket_answers_as_the_local_trees_scanned() {
    let server = S3Server::start();
    let url = server.store_url("cluster-ip");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = receiver(&server, &url, dir_a.path(), "host-a", "127.0.0.1:0");
    let mut b = receiver(&server, &url, dir_b.path(), "host-b", "127.0.0.2:0");
    let out = Command::new(bin("ipevent-test-client"))
        .args([
            "run",
            "--to",
            &a.addr.to_string(),
            "--to",
            &b.addr.to_string(),
        ])
        .args([
            "--json",
            "--no-progress",
            "--scenario",
            "random",
            "--apps",
            "300",
        ])
        .args([
            "--count", "6000", "--rate", "20000", "--seed", "77", "--batch", "64",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("running the test client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = stdout_json(&out)["sent"].as_u64().unwrap();
    wait_for("the receivers to see every datagram sent", || {
        let seen: u64 = [a.stats(), b.stats()]
            .iter()
            .flatten()
            .map(|s| s.datagrams_received + s.kernel_drops)
            .sum();
        (seen >= sent).then_some(())
    });
    sync_shipped(&mut a);
    sync_shipped(&mut b);

    let local = LocalTrees(vec![DataDir::new(dir_a.path()), DataDir::new(dir_b.path())]);
    let listed = local.list_apps().unwrap();
    assert!(!listed.is_empty(), "the receivers stored nothing");
    // Addresses of a few apps, their /24 and /16, an address nobody had, everything.
    let mut questions: Vec<Cidr> = vec!["192.0.2.1".parse().unwrap(), "0.0.0.0/0".parse().unwrap()];
    for listed in listed.iter().step_by(listed.len() / 5 + 1) {
        let read = local.read_app(&listed.app).unwrap().unwrap();
        let ip = read.addrs[read.addrs.len() / 2].0;
        for prefix in [32, 24, 16] {
            questions.push(Cidr { net: ip, prefix }.to_string().parse().unwrap());
        }
    }
    for cidr in questions {
        let expected = apps_by_address(&local, cidr).unwrap();
        let out = query_store(&server, &url, &["ip", &cidr.to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout_json(&out),
            serde_json::to_value(&expected.report).unwrap(),
            "ip {cidr}"
        );
        if cidr.prefix == 32 && cidr.net != u32::from(std::net::Ipv4Addr::new(192, 0, 2, 1)) {
            let answer: Value = stdout_json(&out);
            assert!(!answer["apps"].as_array().unwrap().is_empty(), "ip {cidr}");
        }
    }
    a.stop();
    b.stop();
}
