#!/usr/bin/env bash
# GET /events/{sha} latency of ipevent-api, idle and while a sender floods the receiver.
#
# Starts a release receiver and API on a fresh data dir on 127.0.0.1, then runs CLIENTS
# concurrent keep-alive HTTP connections for DURATION seconds, twice: with no UDP traffic,
# then while a sender offers datagrams as fast as one core can (ipevent-test-client --rate 0,
# or a python3 sender where the client cannot be built). Every GET makes the API sync with
# the receiver (drain and flush) before it reads, so this is the latency of a
# read-after-write query, not of a cached answer.
#
# The load generator is wrk (Debian package `wrk`) when installed; otherwise python3 threads
# with http.client, which saturate the GIL near 3-4k req/s on this machine, so their figures
# measure the client as much as the API.
#
# Usage: bench/api_latency.sh             (from the repository root or anywhere)
#   CLIENTS=50          concurrent HTTP clients
#   DURATION=10         seconds per phase
#   APPS=16             apps the clients query in turn
#   LOADGEN=wrk|python  force a load generator (default: wrk when installed)
#   RECEIVER_CPU=1 SENDER_CPU=0   cores to pin to when taskset exists (the API and the
#                       clients are not pinned)
#
# Prints one line per phase: requests, errors, req/s, p50/p90/p99/max in ms, and the syncs
# the API ran (reads share syncs), then the datagrams the receiver took and kernel drops.
set -euo pipefail

cd "$(dirname "$0")/.."
CLIENTS="${CLIENTS:-50}"
DURATION="${DURATION:-10}"
APPS="${APPS:-16}"
RECEIVER_CPU="${RECEIVER_CPU:-1}"
LOADGEN="${LOADGEN:-$(command -v wrk >/dev/null && echo wrk || echo python)}"
SENDER_CPU="${SENDER_CPU:-0}"

cargo build --release -p ipevent-receiver -p ipevent-api >&2
CLIENT=""
if cargo build --release -p ipevent-test-client >&2 2>/dev/null; then
    CLIENT=target/release/ipevent-test-client
else
    echo "ipevent-test-client does not build: using a python3 sender" >&2
fi

pin_receiver=()
pin_sender=()
if command -v taskset >/dev/null; then
    pin_receiver=(taskset -c "$RECEIVER_CPU")
    pin_sender=(taskset -c "$SENDER_CPU")
else
    echo "taskset not found: running unpinned" >&2
fi

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

data="$work/data"
RUST_LOG=warn "${pin_receiver[@]}" target/release/ipevent-receiver --data-dir "$data" \
    --listen 127.0.0.1:0 --writer-id bench --flush-interval-ms 1000 --stats-interval-ms 200 &
pids+=($!)
RUST_LOG=warn target/release/ipevent-api --data-dir "$data" --listen 127.0.0.1:0 \
    --writer-id api-bench --ready-file "$work/api" &
pids+=($!)

for _ in $(seq 1 1000); do
    [ -s "$work/api" ] && [ -s "$data/receivers/bench/stats.json" ] && break
    sleep 0.01
done
[ -s "$work/api" ] || { echo "the API did not start" >&2; exit 1; }
[ -s "$data/receivers/bench/stats.json" ] || { echo "the receiver did not start" >&2; exit 1; }
api="$(tr -d '\n' <"$work/api")"
udp="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listen"][0])' "$data/receivers/bench/stats.json")"
echo "receiver on $udp, API on $api, $CLIENTS clients, $DURATION s per phase" >&2

# The apps everyone uses: SHA-256 of "bench-app-<i>".
python3 - "$APPS" >"$work/apps" <<'PY'
import hashlib, sys
for i in range(int(sys.argv[1])):
    print(hashlib.sha256(f"bench-app-{i}".encode()).hexdigest())
PY

# Seed every app with one event through POST, so that every GET is a 200.
python3 - "$api" "$work/apps" <<'PY'
import http.client, sys
host, port = sys.argv[1].rsplit(":", 1)
conn = http.client.HTTPConnection(host, int(port), timeout=30)
for i, sha in enumerate(open(sys.argv[2]).read().split()):
    body = b"\x0a\x40" + sha.encode() + b"\x10" + bytes([10 + i % 100])
    conn.request("POST", "/events", body, {"Content-Type": "application/octet-stream"})
    r = conn.getresponse(); r.read()
    assert r.status == 202, r.status
PY

# CLIENTS threads, each with its own keep-alive connection, GET in a loop for DURATION s.
cat >"$work/clients.py" <<'PY'
import http.client, json, sys, threading, time
api, apps_file, clients, duration, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
host, port = api.rsplit(":", 1)
apps = open(apps_file).read().split()

def syncs():
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("ipevent_api_sync_rounds_total{"))

latencies, errors, lock = [], [0], threading.Lock()
start_gate = threading.Barrier(clients + 1)

def client(k):
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    mine, bad, i = [], 0, k
    start_gate.wait()
    end = time.monotonic() + duration
    while time.monotonic() < end:
        path = "/events/" + apps[i % len(apps)]
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            r = conn.getresponse()
            body = r.read()
            took = time.perf_counter() - t0
            if r.status != 200 or "count" not in json.loads(body):
                bad += 1
            mine.append(took)
        except Exception:
            bad += 1
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
    with lock:
        latencies.extend(mine)
        errors[0] += bad

syncs_before = syncs()
threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
for t in threads:
    t.start()
start_gate.wait()
t0 = time.monotonic()
for t in threads:
    t.join()
elapsed = time.monotonic() - t0
rounds = syncs() - syncs_before
latencies.sort()
def pct(p):
    return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else float("nan")
n = len(latencies)
print(f"{label}: {n} GETs, {errors[0]} errors, {n / elapsed:.0f} req/s, "
      f"p50 {pct(50):.2f} ms, p90 {pct(90):.2f} ms, p99 {pct(99):.2f} ms, max {latencies[-1] * 1000 if n else 0:.2f} ms, "
      f"{rounds:.0f} syncs ({n / rounds if rounds else 0:.1f} GETs per sync)")
PY

# wrk: each connection walks the app list; the summary line is built from --latency output.
cat >"$work/apps.lua" <<'LUA'
local apps, i = {}, 0
for line in io.lines(os.getenv("APPS_FILE")) do apps[#apps + 1] = line end
request = function()
    i = i + 1
    return wrk.format("GET", "/events/" .. apps[(i % #apps) + 1], { Accept = "application/json" })
end
LUA

syncs() {
    python3 - "$api" <<'PY'
import http.client, sys
host, port = sys.argv[1].rsplit(":", 1)
conn = http.client.HTTPConnection(host, int(port), timeout=30)
conn.request("GET", "/metrics")
text = conn.getresponse().read().decode()
print(int(sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("ipevent_api_sync_rounds_total{"))))
PY
}

# measure LABEL: one phase of GETs, one summary line.
measure() {
    local label="$1"
    if [ "$LOADGEN" = wrk ]; then
        local before after
        before="$(syncs)"
        APPS_FILE="$work/apps" wrk -t2 -c"$CLIENTS" -d"${DURATION}s" --latency -s "$work/apps.lua" \
            "http://$api" >"$work/wrk.out"
        after="$(syncs)"
        python3 - "$label" "$work/wrk.out" "$((after - before))" <<'PY'
import re, sys
label, text, rounds = sys.argv[1], open(sys.argv[2]).read(), int(sys.argv[3])
def ms(v):
    n, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
dist = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", text, re.M))
n = int(re.search(r"(\d+) requests in", text).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
mx = ms(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", text).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
errs = re.search(r"Socket errors: (.*)", text)
print(f"{label} (wrk): {n} GETs, {int(bad.group(1)) if bad else 0} non-2xx, {rps:.0f} req/s, "
      f"p50 {ms(dist['50']):.2f} ms, p90 {ms(dist['90']):.2f} ms, p99 {ms(dist['99']):.2f} ms, max {mx:.2f} ms, "
      f"{rounds} syncs ({n / rounds if rounds else 0:.1f} GETs per sync)" + (f"; socket errors: {errs.group(1)}" if errs else ""))
PY
    else
        python3 "$work/clients.py" "$api" "$work/apps" "$CLIENTS" "$DURATION" "$label (python)"
    fi
}

stats() {
    python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["datagrams_received"], s["kernel_drops"])' \
        "$data/receivers/bench/stats.json"
}

measure "idle"

read -r received_before drops_before < <(stats)
if [ -n "$CLIENT" ]; then
    "${pin_sender[@]}" "$CLIENT" run --scenario random --apps "$APPS" --rate 0 \
        --duration "$((DURATION + 30))" --corrupt-pct 10 --seed 1 --to "$udp" --no-progress \
        >/dev/null 2>"$work/sender.log" &
else
    "${pin_sender[@]}" python3 - "$udp" "$work/apps" <<'PY' &
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
shas = open(sys.argv[2]).read().split()
# Pre-encoded datagrams: tag 0x0a, length 64, the SHA, tag 0x10, a one-byte varint address.
payloads = [b"\x0a\x40" + sha.encode() + b"\x10" + bytes([ip]) for sha in shas for ip in range(1, 100)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
to = (host, int(port))
while True:
    for p in payloads:
        s.sendto(p, to)
PY
fi
sender_pid=$!
pids+=("$sender_pid")
# Measure only once the flood is flowing.
for _ in $(seq 1 500); do
    read -r received _ < <(stats)
    [ "$received" -gt "$((received_before + 10000))" ] && break
    sleep 0.01
done

measure "under load"
kill "$sender_pid" 2>/dev/null || true
wait "$sender_pid" 2>/dev/null || true
sleep 0.5 # one stats interval and more, so the file has the last counters
read -r received_after drops_after < <(stats)
echo "receiver during the load phase: $((received_after - received_before)) datagrams read, $((drops_after - drops_before)) kernel drops"
