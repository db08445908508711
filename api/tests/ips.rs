//! `GET /ips/{addr}` and `GET /ips/{net}/{prefix}` over real HTTP.

mod common;

use common::{app, datagram, Api, ApiHttp};
use serde_json::json;

#[test]
fn ips_answers_the_apps_of_an_address_or_block_and_400_for_bad_input() {
    let data = tempfile::tempdir().unwrap();
    let api = Api::start(data.path(), &[]);
    for (byte, ip) in [
        (1, "10.0.0.1"),
        (1, "10.0.0.2"),
        (1, "185.220.101.7"),
        (2, "185.220.101.7"),
        (2, "185.220.101.7"),
        (3, "8.8.8.8"),
    ] {
        assert_eq!(api.post(&datagram(&app(byte), ip)).status, 202);
    }
    let reply = api.get("/ips/185.220.101.7");
    assert_eq!(reply.status, 200, "{reply:?}");
    let value = reply.json();
    assert_eq!(value["ip"], "185.220.101.7");
    let apps = value["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 2, "{value}");
    assert_eq!(apps[0]["app_sha256"], app(2).to_hex());
    assert_eq!(apps[0]["count"], 2);
    assert_eq!(apps[0]["good"], true);
    assert_eq!(apps[1]["app_sha256"], app(1).to_hex());
    assert_eq!(apps[1]["good"], false);

    let block = api.get("/ips/185.220.101.0/24").json();
    assert_eq!(block["ip"], "185.220.101.0/24");
    assert_eq!(block["apps"].as_array().unwrap().len(), 2);
    assert_eq!(
        api.get("/ips/192.0.2.1").json(),
        json!({"ip": "192.0.2.1", "apps": []})
    );

    for bad in [
        "/ips/185.220.101",
        "/ips/185.220.101.0/33",
        "/ips/x",
        "/ips/1.2.3.4/x",
    ] {
        let reply = api.get(bad);
        assert_eq!(reply.status, 400, "{bad}: {reply:?}");
        assert!(reply.error().contains("not an IPv4 address"), "{reply:?}");
    }
}
