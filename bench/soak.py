#!/usr/bin/env python3
"""Soak: the real receiver under steady traffic with corruption for a long time.

Starts a release ipevent-receiver on 127.0.0.1 with a temporary data dir, has
ipevent-test-client send the lookout scenario at a fixed rate with 30% corrupted datagrams for
the given duration (receiver and sender pinned to different cores when taskset exists), samples
the receiver's resident memory, open file descriptors and counters every few seconds, and at
the end lets the test client verify the exact count and lists through `ipevent-query --sync`.

    python3 bench/soak.py                      # 10 minutes at 100k datagrams/s
    python3 bench/soak.py --duration 60        # a shorter run

Writes bench/results/soak-<time>.json and prints a summary. Exit 0 only when the count is
exact, nothing was dropped, and memory and descriptors stayed flat.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")


def pinned(cpu, argv):
    if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1:
        return ["taskset", "-c", str(cpu)] + argv
    return argv


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def read_stats(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=600, help="seconds of traffic")
    parser.add_argument("--rate", type=int, default=100_000, help="datagrams per second")
    parser.add_argument("--corrupt-pct", type=int, default=30)
    parser.add_argument("--sample-secs", type=float, default=5.0)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()

    if not args.no_build:
        subprocess.run(
            ["cargo", "build", "--release", "-p", "ipevent-receiver", "-p", "ipevent-query",
             "-p", "ipevent-test-client"],
            cwd=ROOT, check=True)

    data = tempfile.mkdtemp(prefix="ipevent-soak-")
    stats_path = os.path.join(data, "receivers", "soak", "stats.json")
    receiver_cmd = [os.path.join(RELEASE, "ipevent-receiver"), "--listen", "127.0.0.1:0",
                    "--data-dir", data, "--writer-id", "soak", "--log-interval-s", "0"]
    if os.geteuid() == 0:
        receiver_cmd.append("--allow-root")
    receiver = subprocess.Popen(pinned(1, receiver_cmd), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    stats = None
    while time.monotonic() < deadline:
        stats = read_stats(stats_path)
        if stats and stats.get("pid") == receiver.pid:
            break
        if receiver.poll() is not None:
            sys.exit("the receiver exited at start")
        time.sleep(0.05)
    if not stats:
        sys.exit("the receiver did not become ready")
    addr = stats["listen"][0]

    client_cmd = [os.path.join(RELEASE, "ipevent-test-client"), "run", "--to", addr,
                  "--rate", str(args.rate), "--duration", str(args.duration),
                  "--corrupt-pct", str(args.corrupt_pct), "--data-dir", data,
                  "--query-bin", os.path.join(RELEASE, "ipevent-query"), "--json",
                  "--no-progress"]
    started = time.monotonic()
    client = subprocess.Popen(pinned(0, client_cmd), stdout=subprocess.PIPE)
    samples = []
    while client.poll() is None:
        time.sleep(args.sample_secs)
        s = read_stats(stats_path) or {}
        samples.append({
            "secs": round(time.monotonic() - started, 1),
            "rss_kib": proc_status(receiver.pid, "VmRSS"),
            "fds": len(os.listdir(f"/proc/{receiver.pid}/fd")),
            "received": s.get("datagrams_received"),
            "accepted": s.get("events_accepted"),
            "kernel_drops": s.get("kernel_drops"),
            "flush_max_ms": s.get("flush_max_ms"),
        })
    summary = json.loads(client.stdout.read() or b"{}")
    peak_rss_kib = proc_status(receiver.pid, "VmHWM")
    receiver.terminate()
    receiver.wait(timeout=60)
    final = read_stats(stats_path) or {}
    shutil.rmtree(data, ignore_errors=True)

    # Flat: after the first minute (or the first third), memory and descriptors stay within a
    # small band of where they settled.
    settle = max(1, min(len(samples) // 3, int(60 / args.sample_secs)))
    steady = samples[settle:] or samples
    rss = [x["rss_kib"] for x in steady]
    fds = [x["fds"] for x in steady]
    rss_growth_kib = max(rss) - rss[0] if rss else 0
    verification = summary.get("verification", {})
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python3 bench/soak.py " + " ".join(sys.argv[1:]),
        "duration_secs": args.duration,
        "rate_per_sec": args.rate,
        "sent": summary.get("sent"),
        "valid": summary.get("valid"),
        "achieved_rate_per_sec": summary.get("rate_per_sec"),
        "verified_ok": bool(verification.get("ok")) if isinstance(verification, dict) else False,
        "verification": verification,
        "kernel_drops": final.get("kernel_drops"),
        "events_flushed": final.get("events_flushed"),
        "rss_steady_min_kib": min(rss) if rss else None,
        "rss_steady_max_kib": max(rss) if rss else None,
        "rss_growth_after_settling_kib": rss_growth_kib,
        "peak_rss_kib": peak_rss_kib,
        "fds_min": min(fds) if fds else None,
        "fds_max": max(fds) if fds else None,
        "flush_max_ms": final.get("flush_max_ms"),
        "samples": samples,
    }
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    out = os.path.join(ROOT, "bench", "results",
                       "soak-" + datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S") + ".json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)

    flat = rss_growth_kib <= 8 * 1024 and (max(fds) - min(fds) <= 2 if fds else True)
    ok = result["verified_ok"] and result["kernel_drops"] == 0 and flat
    print(f"| figure | value |\n| --- | --- |")
    print(f"| traffic | {result['sent']} datagrams in {args.duration} s, "
          f"{result['achieved_rate_per_sec'] or 0:.0f}/s, {args.corrupt_pct}% corrupted |")
    print(f"| count exact (ipevent-query --sync) | {result['verified_ok']} |")
    print(f"| kernel drops | {result['kernel_drops']} |")
    print(f"| resident memory after settling | {result['rss_steady_min_kib']} .. "
          f"{result['rss_steady_max_kib']} KiB (growth {rss_growth_kib} KiB), peak {peak_rss_kib} KiB |")
    print(f"| open descriptors | {result['fds_min']} .. {result['fds_max']} |")
    print(f"| longest flush | {result['flush_max_ms']:.1f} ms |" if result["flush_max_ms"] is not None
          else "| longest flush | n/a |")
    print(f"results: {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
