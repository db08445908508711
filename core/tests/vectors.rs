//! Every wire vector against the decoder and every classify case against the classifier, as
//! `testdata/` (a copy of the shared vectors) defines them.

use std::net::Ipv4Addr;

use ipevent_core::store::AddrStats;
use ipevent_core::testdata;
use ipevent_core::wire::{self, Reject};

fn ip(text: &str) -> u32 {
    u32::from(text.parse::<Ipv4Addr>().unwrap())
}

#[test]
fn every_wire_vector_gets_its_verdict() {
    let vectors = testdata::wire_vectors().unwrap();
    assert!(vectors.len() >= 29, "the vector file lost entries");
    for v in &vectors {
        let name = &v.name;
        let got = wire::decode(&v.bytes);
        match &v.verdict {
            Ok((sha, dotted)) => {
                let event = got.unwrap_or_else(|r| panic!("{name}: rejected as {r}"));
                assert_eq!(&event.app.to_hex(), sha, "{name}");
                assert_eq!(Some(u64::from(event.ip)), v.ip_int, "{name}");
                assert_eq!(event.ip, ip(dotted), "{name}");
                // What we would send for it decodes to the same event.
                assert_eq!(
                    wire::decode(&wire::encode_to_vec(&event)),
                    Ok(event),
                    "{name}"
                );
            }
            Err(reason) => {
                let want = Reject::from_name(reason).unwrap();
                assert_eq!(got, Err(want), "{name}");
            }
        }
    }
}

#[test]
fn every_classify_case_gets_its_report() {
    let cases = testdata::read_json("classify.json").unwrap();
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
