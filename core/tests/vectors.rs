//! Every wire vector against the decoder and every classify case against the classifier, as
//! `testdata/` (a copy of the shared vectors) defines them.

use std::net::Ipv4Addr;

use ipevent_core::store::AddrStats;
use ipevent_core::wire::{self, Reject};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/../testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn unhex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2));
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn ip(text: &str) -> u32 {
    u32::from(text.parse::<Ipv4Addr>().unwrap())
}

#[test]
fn every_wire_vector_gets_its_verdict() {
    let vectors = load("ipevent.json");
    let list = vectors["vectors"].as_array().unwrap();
    assert!(list.len() >= 29, "the vector file lost entries");
    for v in list {
        let name = v["name"].as_str().unwrap();
        let bytes = unhex(v["hex"].as_str().unwrap());
        let got = wire::decode(&bytes);
        if v["valid"].as_bool().unwrap() {
            let event = got.unwrap_or_else(|r| panic!("{name}: rejected as {r}"));
            assert_eq!(
                event.app.to_hex(),
                v["app_sha256"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(u64::from(event.ip), v["ip_int"].as_u64().unwrap(), "{name}");
            assert_eq!(event.ip, ip(v["ip"].as_str().unwrap()), "{name}");
            // What we would send for it decodes to the same event.
            assert_eq!(
                wire::decode(&wire::encode_to_vec(&event)),
                Ok(event),
                "{name}"
            );
        } else {
            let want = Reject::from_name(v["reason"].as_str().unwrap()).unwrap();
            assert_eq!(got, Err(want), "{name}");
        }
    }
}

#[test]
fn every_classify_case_gets_its_report() {
    let cases = load("classify.json");
    let list = cases["cases"].as_array().unwrap();
    assert!(list.len() >= 8, "the classify file lost cases");
    for case in list {
        let name = case["name"].as_str().unwrap();
        let mut addrs: Vec<(u32, AddrStats)> = case["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let times = e["times"].as_u64().unwrap();
                (
                    ip(e["ip"].as_str().unwrap()),
                    AddrStats {
                        count: times,
                        first_seen: 1,
                        last_seen: 1,
                    },
                )
            })
            .collect();
        // The answer must not depend on the order addresses come in.
        for round in 0..2 {
            if round == 1 {
                addrs.reverse();
            }
            let report = ipevent_core::classify(&addrs);
            let expect = &case["expect"];
            let exact = format!(
                "{{\"count\":{},\"good_ips\":{},\"bad_ips\":{}}}",
                expect["count"], expect["good_ips"], expect["bad_ips"]
            );
            assert_eq!(report.to_json(false), exact, "{name} (round {round})");
        }
    }
}
