#!/usr/bin/env python3
"""Store benchmarks: one giant app, and a million apps.

    python3 bench/store.py giant [--addrs 16000000] [--root /dev/shm]
    python3 bench/store.py many-apps [--apps 1000000] [--root /dev/shm] [--keep DIR] [--strace]
    python3 bench/store.py list DIR [--runs 5]
    python3 bench/store.py ip DIR ADDR[/PREFIX] [--runs 5]

`giant`: one receiver; `ipevent-blast` sends one app ADDRS distinct addresses as fast as it
can while, every second, a second app gets one event and `ipevent-query --sync` asks for it.
Prints how many of those syncs answered with the event (and their slowest wall time), the
flushes and their longest, the bytes the writer appended and rewrote (compaction), the peak
resident memory of the receiver (VmHWM) and how long SIGTERM took to end it.

`many-apps`: one receiver with a 1-hour flush interval takes `--apps` new apps
(`ipevent-test-client`, random scenario, `--events-per-app` events per app, default 3, drawn
from its 14 hosts and 1 to 10 outsiders: 13 give about 10 distinct addresses per app);
SIGTERM then makes one flush that creates every app (more when the pending map fills). Prints that flush's duration (`flush_last_ms`), per app, and, with
`--strace`, the syscalls of the whole run by count (`strace -f -c`). `--keep DIR` leaves the
store there for `list`.

`list DIR`: times `ipevent-query --data-dir DIR list --limit 0` (process start included).

`ip DIR ADDR`: times `ipevent-query --data-dir DIR ip ADDR` (process start included) and says
how many apps the answer held.

Linux, Python 3 (standard library), the release binaries (`cargo build --release
--workspace` and `cargo build --release --manifest-path bench/drain/Cargo.toml`).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
TOOLS = ROOT / "bench" / "drain" / "target" / "release"
OTHER_APP = "0" * 63 + "1"


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def wait_until(what, check, limit_s=3600):
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def vm_hwm_mib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def start_receiver(data, extra, prefix=()):
    data.mkdir(parents=True, exist_ok=True)
    stats_path = data / "receivers" / "bench" / "stats.json"
    logf = open(data.parent / f"{data.name}.receiver.log", "w")
    env = dict(os.environ, IPEVENT_ALLOW_ROOT="true")
    proc = subprocess.Popen(
        [*prefix, str(RELEASE / "ipevent-receiver"), "--listen", "127.0.0.1:0",
         "--writer-id", "bench", "--data-dir", str(data), "--stats-interval-ms", "200",
         "--log-interval-s", "0", *extra],
        stdout=subprocess.DEVNULL, stderr=logf, env=env)
    stats = wait_until("the receiver's stats", lambda: read_json(stats_path), 60)
    return proc, stats["pid"], stats["listen"][0], stats_path


def stop(proc, pid, peak):
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    while proc.poll() is None:
        hwm = vm_hwm_mib(pid)
        if hwm:
            peak = max(peak, hwm)
        time.sleep(0.05)
    return proc.returncode, time.monotonic() - started, peak


def case_giant(args):
    work = Path(tempfile.mkdtemp(prefix="ipevent-giant-", dir=args.root))
    try:
        proc, pid, addr, stats_path = start_receiver(work / "d", [])
        blast = subprocess.Popen(
            [str(TOOLS / "ipevent-blast"), "--to", addr, "--apps", "1", "--addrs",
             str(args.addrs), "--count", str(args.addrs), "--seed", "7"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        syncs, answered, slowest, peak, sent_other = 0, 0, 0.0, 0.0, 0
        while blast.poll() is None or syncs < 3:
            subprocess.run([str(RELEASE / "ipevent-test-client"), "send", "--to", addr,
                            OTHER_APP, "10.0.0.1"], capture_output=True, check=True)
            sent_other += 1
            started = time.monotonic()
            done = subprocess.run([str(RELEASE / "ipevent-query"), "--data-dir", str(work / "d"),
                                   "--sync", OTHER_APP], capture_output=True, text=True)
            slowest = max(slowest, time.monotonic() - started)
            syncs += 1
            if done.returncode == 0 and json.loads(done.stdout)["count"] == sent_other:
                answered += 1
            peak = max(peak, vm_hwm_mib(pid) or 0)
            time.sleep(1)
        blast_out = json.loads(blast.stdout.read() or "{}")
        log("blast done; waiting for the receiver to take in what it can, then SIGTERM")
        time.sleep(2)
        code, exit_secs, peak = stop(proc, pid, peak)
        stats = read_json(stats_path)
        done = subprocess.run([str(RELEASE / "ipevent-query"), "--data-dir", str(work / "d"),
                               "list", "--limit", "0"], capture_output=True, text=True)
        listed = json.loads(done.stdout) if done.returncode == 0 else []
        result = {
            "addrs_sent": args.addrs, "blast": blast_out,
            "received": stats["datagrams_received"], "kernel_drops": stats["kernel_drops"],
            "events_flushed": stats["events_flushed"],
            "stored": sum(a["count"] for a in listed),
            "refused": stats.get("refused", {}),
            "flushes": stats["flushes"], "flush_max_ms": stats["flush_max_ms"],
            "store_appended_bytes": stats.get("store_appended_bytes"),
            "store_rewritten_bytes": stats.get("store_rewritten_bytes"),
            "syncs": syncs, "syncs_answered_with_the_event": answered,
            "slowest_sync_secs": round(slowest, 2),
            "peak_rss_mib": round(peak, 1), "sigterm_exit_secs": round(exit_secs, 2),
            "exit_code": code,
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def case_many_apps(args):
    work = Path(tempfile.mkdtemp(prefix="ipevent-apps-", dir=args.root))
    data = Path(args.keep) if args.keep else work / "d"
    prefix = ()
    if args.strace:
        prefix = ("strace", "-f", "-c", "-o", str(work / "strace.txt"))
    try:
        proc, pid, addr, stats_path = start_receiver(
            data, ["--flush-interval-ms", "3600000"], prefix)
        if args.strace:
            # strace's child is the receiver; stats name its pid.
            pid = read_json(stats_path)["pid"]
        sent = subprocess.run(
            [str(RELEASE / "ipevent-test-client"), "run", "--to", addr, "--scenario", "random",
             "--apps", str(args.apps), "--count", str(args.apps * args.events_per_app),
             "--rate", "0",
             "--seed", "11", "--json", "--no-progress"],
            capture_output=True, text=True)
        sent = json.loads(sent.stdout)
        wait_until("every datagram in", lambda: (
            (s := read_json(stats_path)) and s["datagrams_received"] + s["kernel_drops"]
            >= sent["sent"]))
        log("every datagram in; SIGTERM makes one flush of every app")
        code, exit_secs, peak = stop(proc, pid, vm_hwm_mib(pid) or 0)
        stats = read_json(stats_path)
        apps = sum(1 for fan in (data / "events").iterdir()
                   if fan.is_dir() and len(fan.name) == 2
                   for _ in fan.iterdir()) if args.count_apps else None
        result = {
            "apps_sent": args.apps, "datagrams": sent["sent"], "exit_code": code,
            "flush_ms": stats["flush_last_ms"], "apps_counted": apps,
            "flush_us_per_app": stats["flush_last_ms"] * 1e3 / args.apps,
            "sigterm_exit_secs": round(exit_secs, 2), "peak_rss_mib": round(peak, 1),
        }
        print(json.dumps(result, indent=2))
        if args.strace:
            print((work / "strace.txt").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def case_list(args):
    times = []
    for _ in range(args.runs):
        started = time.monotonic()
        done = subprocess.run([str(RELEASE / "ipevent-query"), "--data-dir", args.dir, "list",
                               "--limit", "0"], capture_output=True, text=True)
        times.append(time.monotonic() - started)
        if done.returncode != 0:
            raise SystemExit(f"list: exit {done.returncode}: {done.stderr.strip()}")
    apps = json.loads(done.stdout)
    print(json.dumps({"apps": len(apps), "events": sum(a["count"] for a in apps),
                      "secs": [round(t, 3) for t in times],
                      "median_secs": round(sorted(times)[len(times) // 2], 3)}, indent=2))


def case_ip(args):
    times = []
    for _ in range(args.runs):
        started = time.monotonic()
        done = subprocess.run([str(RELEASE / "ipevent-query"), "--data-dir", args.dir, "ip",
                               args.addr], capture_output=True, text=True)
        times.append(time.monotonic() - started)
        if done.returncode != 0:
            raise SystemExit(f"ip: exit {done.returncode}: {done.stderr.strip()}")
    answer = json.loads(done.stdout)
    print(json.dumps({"ip": answer["ip"], "apps_found": len(answer["apps"]),
                      "secs": [round(t, 3) for t in times],
                      "median_secs": round(sorted(times)[len(times) // 2], 3)}, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", help="where the ipevent binaries are (default target/release)")
    parser.add_argument("--tools-dir", help="where ipevent-blast is (default bench/drain/target/release)")
    sub = parser.add_subparsers(dest="case", required=True)
    giant = sub.add_parser("giant")
    giant.add_argument("--addrs", type=int, default=16_000_000)
    giant.add_argument("--root", default="/dev/shm")
    many = sub.add_parser("many-apps")
    many.add_argument("--apps", type=int, default=1_000_000)
    many.add_argument("--root", default="/dev/shm")
    many.add_argument("--keep", help="build the store in this dir and leave it there")
    many.add_argument("--strace", action="store_true", help="count syscalls (strace -f -c)")
    many.add_argument("--count-apps", action="store_true", help="count the app directories")
    many.add_argument("--events-per-app", type=int, default=3,
                      help="events sent per app (13: about 10 distinct addresses each)")
    lst = sub.add_parser("list")
    lst.add_argument("dir")
    lst.add_argument("--runs", type=int, default=5)
    ip = sub.add_parser("ip")
    ip.add_argument("dir")
    ip.add_argument("addr")
    ip.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    global RELEASE, TOOLS
    if args.bin_dir:
        RELEASE = Path(args.bin_dir)
    if args.tools_dir:
        TOOLS = Path(args.tools_dir)
    {"giant": case_giant, "many-apps": case_many_apps, "list": case_list,
     "ip": case_ip}[args.case](args)


if __name__ == "__main__":
    main()
