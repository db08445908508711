#!/usr/bin/env python3
"""Where a shipping receiver's CPU goes: per-thread CPU while it ships a burst.

    python3 bench/ship_threads.py [--secs 30] [--rate 100000] [--apps 100000] [--ship-ms 5000]

One receiver with `--store` on a fresh SeaweedFS (from .venv-s3), fed --rate datagrams/s over
--apps apps (random scenario, no corruption) for --secs. Prints the receiver's epochs, what is
shipped and published, once a second, until everything sent is published (or 60 s after the
sender ends), then the CPU seconds of each of the receiver's threads (`/proc/<pid>/task`,
summed by thread name: `ipevent-s3` is SlateDB's and the S3 client's runtime, `ipevent-s3-comp`
SlateDB's compaction, `shipper` the
thread that applies the outbox, `writer` the local tree) and the shipping CPU per event
shipped. Needs the release binaries, as bench/cluster.py does.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster as c  # noqa: E402


def thread_cpu(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0) + (int(f[11]) + int(f[12])) / c.CLK_TCK
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--secs", type=int, default=30)
    p.add_argument("--rate", type=int, default=100_000)
    p.add_argument("--apps", type=int, default=100_000)
    p.add_argument("--ship-ms", type=int, default=5000)
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="ship-threads-", dir=os.path.join(c.ROOT, "target"))
    weed = c.Seaweed(work)
    try:
        r = c.Receiver(work, "ship", "127.0.0.1:0", weed.env(), None,
                       ["--store", "s3://ipevent/bench/ship", "--ship-interval-ms",
                        str(a.ship_ms)])
        r.sync_shipped(weed.env())
        sender = subprocess.Popen([
            os.path.join(c.RELEASE, "ipevent-test-client"), "run", "--to", r.addr, "--json",
            "--no-progress", "--scenario", "random", "--apps", str(a.apps), "--rate",
            str(a.rate), "--duration", str(a.secs), "--corrupt-pct", "0", "--seed", "11"],
            env=weed.env(), stdout=subprocess.PIPE)
        start = time.time()
        ended = None
        while True:
            s = r.stats()
            if s:
                print(f"{time.time() - start:6.1f} s: epoch {s['epoch']} shipped "
                      f"{s['shipped_epoch']} published {s['published_epoch']} outbox "
                      f"{s['ship_lag_epochs']} entries, {s['outbox_bytes'] >> 10} KiB; load "
                      f"{c.loadavg()}", flush=True)
            if sender.poll() is not None:
                ended = ended or time.time()
                if (s and s["ship_lag_epochs"] == 0 and s["events_pending"] == 0) \
                        or time.time() - ended > 60:
                    break
            time.sleep(1)
        summary = json.loads(sender.stdout.read())
        cpu = thread_cpu(r.proc.pid)
        s = r.stats()
        r.stop()
        shipping = cpu.get("shipper", 0) + sum(
            v for k, v in cpu.items() if k.startswith("ipevent-s3"))
        print(json.dumps({
            "sent": summary["sent"], "all_published": s["ship_lag_epochs"] == 0,
            "thread_cpu_s": {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
            "shipping_cpu_us_per_event": round(shipping * 1e6 / summary["sent"], 2),
            "load": c.loadavg()}, indent=1))
    finally:
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
