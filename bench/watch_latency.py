#!/usr/bin/env python3
"""Watch latency: from a datagram reaching the receiver's socket to its line from
`ipevent-query watch`.

    python3 bench/watch_latency.py [--trials 200] [--flush-interval-ms 1000] [--root /dev/shm]
                                   [--store [--ship-interval-ms 1000]]

One receiver (`--flush-interval-ms`, default 1000) and one `ipevent-query watch` on a fresh
data dir. Each trial waits a random time (uniform over one flush interval, so that sends fall
at every phase of the flush clock), sends one datagram with an address the app has not had
(bad: outside its /28) over loopback, and times until the watch prints its line. On loopback
`sendto` returns once the datagram is in the receiving socket's buffer, so the clock starts
when the datagram reaches the socket. A trial whose line does not come within five flush
intervals is counted as lost and sent again under a new address.

With `--store`, a SeaweedFS server (`weed mini` from `.venv-s3`, as `bench/cluster.py` starts
it) holds the bucket: the receiver ships to it and the watch follows the bucket
(`ipevent-query --store s3://ipevent/watch watch`), so the time also covers shipping,
publishing and the watch's look at the bucket.

Prints the latencies' percentiles (ms) as JSON. Linux, Python 3 (standard library), the
release binaries (`cargo build --release -p ipevent-receiver -p ipevent-query`).
"""

import argparse
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
APP = "ab" * 32


def datagram(app_hex, ip):
    """The IpEvent protobuf: field 1 (string), field 2 (varint)."""
    sha = app_hex.encode()
    out = bytes([0x0A, len(sha)]) + sha + bytes([0x10])
    while True:
        byte = ip & 0x7F
        ip >>= 7
        if ip:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def wait_until(what, check, limit_s=60):
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


class LineReader:
    """Lines of a pipe, with a timeout."""

    def __init__(self, pipe):
        self.fd = pipe.fileno()
        self.buf = b""

    def line(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--flush-interval-ms", type=int, default=1000)
    parser.add_argument("--root", default="/dev/shm")
    parser.add_argument("--bin-dir", help="where the ipevent binaries are (default target/release)")
    parser.add_argument("--store", action="store_true",
                        help="ship to a local SeaweedFS bucket and watch the bucket")
    parser.add_argument("--ship-interval-ms", type=int, default=1000)
    args = parser.parse_args()
    bins = Path(args.bin_dir) if args.bin_dir else RELEASE
    interval_s = args.flush_interval_ms / 1000
    work = Path(tempfile.mkdtemp(prefix="ipevent-watch-", dir=args.root))
    procs = []
    try:
        data = work / "d"
        env = dict(os.environ, IPEVENT_ALLOW_ROOT="true")
        store = []
        if args.store:
            sys.path.insert(0, str(ROOT / "bench"))
            from cluster import Seaweed
            weed = Seaweed(str(work))
            procs.append(weed.proc)
            env = dict(weed.env(), IPEVENT_ALLOW_ROOT="true")
            store = ["--store", "s3://ipevent/watch"]
        receiver = subprocess.Popen(
            [str(bins / "ipevent-receiver"), "--listen", "127.0.0.1:0", "--writer-id", "bench",
             "--data-dir", str(data), "--flush-interval-ms", str(args.flush_interval_ms),
             "--log-interval-s", "0"]
            + (store + ["--ship-interval-ms", str(args.ship_interval_ms)] if store else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(receiver)
        stats = wait_until("the receiver", lambda: read_json(data / "receivers/bench/stats.json"))
        host, port = stats["listen"][0].rsplit(":", 1)
        to = (host, int(port))
        watch = subprocess.Popen(
            [str(bins / "ipevent-query"), "--data-dir", str(data)] + store + ["watch"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        procs.append(watch)
        said = LineReader(watch.stderr).line(60)
        if not said or "watching" not in said:
            raise SystemExit(f"the watch did not start: {said!r}")
        lines = LineReader(watch.stdout)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # The app's /28: three hosts, so that every later outsider is bad.
        for host_byte in (1, 2, 3):
            tx.sendto(datagram(APP, (10 << 24) | host_byte), to)
        rng = random.Random(7)
        # Each address is the network address (.0) of its own /28: never a host, so always
        # bad, and never enough to move the app's netblock.
        latencies_ms, lost, next_ip = [], 0, 8 << 24
        load_before = os.getloadavg()
        while len(latencies_ms) < args.trials:
            time.sleep(rng.uniform(0, interval_s))
            ip = next_ip
            next_ip += 16
            dotted = socket.inet_ntoa(ip.to_bytes(4, "big"))
            sent = time.monotonic()
            tx.sendto(datagram(APP, ip), to)
            while True:
                line = lines.line(5 * interval_s + 5)
                if line is None:
                    lost += 1
                    break
                if json.loads(line)["ip"] == dotted:
                    latencies_ms.append((time.monotonic() - sent) * 1e3)
                    break
        values = sorted(latencies_ms)
        result = {
            "trials": len(values), "lost_and_resent": lost,
            "flush_interval_ms": args.flush_interval_ms,
            "store": "s3 (SeaweedFS)" if store else "local tree",
            "ship_interval_ms": args.ship_interval_ms if store else None,
            "p50_ms": round(percentile(values, 50), 1),
            "p90_ms": round(percentile(values, 90), 1),
            "p99_ms": round(percentile(values, 99), 1),
            "min_ms": round(values[0], 1), "max_ms": round(values[-1], 1),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        }
        print(json.dumps(result, indent=2))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
