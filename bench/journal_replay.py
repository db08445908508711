#!/usr/bin/env python3
"""Peak resident memory of a receiver that starts on a full journal.

Fills the journal of a receiver (default size, 256 MiB) by sending events with a flush
interval of an hour, kills it with SIGKILL, starts it again on the same data dir and reports
what the restart replayed, how long it took to be ready and its peak resident memory (VmHWM)
once the replay is flushed.

    cargo build --release -p ipevent-receiver -p ipevent-test-client
    python3 bench/journal_replay.py [--journal-bytes N] [--receiver-bin PATH]

Standard library only. Writes nothing outside a temporary directory.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stats(data_dir):
    try:
        with open(os.path.join(data_dir, "receivers", "bench", "stats.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def wait_stats(data_dir, what, pred, limit_s=600):
    start = time.monotonic()
    while True:
        s = stats(data_dir)
        if s is not None and pred(s):
            return s
        if time.monotonic() - start > limit_s:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.01)


def settled(data_dir):
    """Stats once the receiver has taken in everything sent (two snapshots agree)."""
    last = None
    while True:
        s = wait_stats(data_dir, "stats", lambda s: True)
        if last is not None and s["events_accepted"] == last["events_accepted"] \
                and s["updated_unix"] > last["updated_unix"]:
            return s
        if last is None or s["events_accepted"] != last["events_accepted"]:
            last = s
        time.sleep(0.05)


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def start(receiver, data_dir, journal_bytes):
    try:
        os.remove(os.path.join(data_dir, "receivers", "bench", "stats.json"))
    except FileNotFoundError:
        pass
    env = dict(os.environ, IPEVENT_ALLOW_ROOT="true", RUST_LOG="warn")
    proc = subprocess.Popen(
        [receiver, "--listen", "127.0.0.1:0", "--writer-id", "bench", "--data-dir", data_dir,
         "--flush-interval-ms", "3600000", "--journal-bytes", str(journal_bytes),
         "--max-pending-entries", str(1 << 26)],
        env=env, stdin=subprocess.DEVNULL)
    s = wait_stats(data_dir, "the receiver to start", lambda s: s.get("pid") == proc.pid)
    return proc, s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--journal-bytes", type=int, default=256 << 20)
    ap.add_argument("--receiver-bin", default=os.path.join(ROOT, "target/release/ipevent-receiver"))
    ap.add_argument("--client-bin", default=os.path.join(ROOT, "target/release/ipevent-test-client"))
    args = ap.parse_args()
    record_bytes = 40
    # Leave room for the batch headers: stop at 97% of what the journal holds.
    target = int((args.journal_bytes - 4096) / record_bytes * 0.97)
    with tempfile.TemporaryDirectory() as data_dir:
        proc, s = start(args.receiver_bin, data_dir, args.journal_bytes)
        sent = 0
        while s["events_accepted"] < target:
            chunk = min(2_000_000, int((target - s["events_accepted"]) / 0.95) + 1000)
            subprocess.run(
                [args.client_bin, "run", "--to", s["listen"][0], "--rate", "0", "--count", str(chunk),
                 "--corrupt-pct", "0", "--no-progress", "--seed", str(sent)],
                check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            sent += chunk
            s = settled(data_dir)
        s = stats(data_dir) or s
        accepted = s["events_accepted"]
        journal_used = s["journal_used_bytes"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        began = time.monotonic()
        proc, _ = start(args.receiver_bin, data_dir, args.journal_bytes)
        ready_s = time.monotonic() - began
        s = wait_stats(data_dir, "the replay to be flushed", lambda s: s.get("events_pending") == 0)
        peak = vm_hwm_kib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        print(json.dumps({
            "journal_bytes": args.journal_bytes,
            "journal_used_bytes": journal_used,
            "events_accepted_before_kill": accepted,
            "events_replayed": s["events_replayed"],
            "restart_to_ready_s": round(ready_s, 2),
            "peak_rss_mib_after_replay": round(peak / 1024, 1),
        }, indent=2))


if __name__ == "__main__":
    main()
