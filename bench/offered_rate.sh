#!/usr/bin/env bash
# Offered rate of ipevent-test-client: how many datagrams per second one sender core pushes
# through sendmmsg on loopback, at --rate 0, into a sink that only reads.
#
# Usage: bench/offered_rate.sh            (from the repository root or anywhere)
#   COUNT=5000000        datagrams per run
#   CORRUPT_PCT=30       share of corrupted datagrams (the client's default)
#   SCENARIO=random APPS=1000   which apps send (APPS only for the random scenario)
#   SENDER_CPU=0 SINK_CPU=1     cores to pin to when taskset exists
#
# Prints the client's summary line, "offered_rate_per_sec N" (wall clock) and
# "rate_per_sec_unshared N" (sent / (elapsed - time the sender waited for a CPU): what one
# core sustains when nothing else runs on it; on a busy machine the wall-clock figure is lower).
set -euo pipefail

cd "$(dirname "$0")/.."
COUNT="${COUNT:-5000000}"
CORRUPT_PCT="${CORRUPT_PCT:-30}"
SCENARIO="${SCENARIO:-random}"
APPS="${APPS:-1000}"
SENDER_CPU="${SENDER_CPU:-0}"
SINK_CPU="${SINK_CPU:-1}"

cargo build --release -p ipevent-test-client >&2
CLIENT=target/release/ipevent-test-client

pin_sender=()
pin_sink=()
if command -v taskset >/dev/null; then
    pin_sender=(taskset -c "$SENDER_CPU")
    pin_sink=(taskset -c "$SINK_CPU")
else
    echo "taskset not found: running unpinned" >&2
fi

work="$(mktemp -d)"
sink_pid=""
cleanup() {
    if [ -n "$sink_pid" ]; then kill "$sink_pid" 2>/dev/null || true; wait "$sink_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# The sink: a UDP socket on 127.0.0.1 that reads and counts, so the send path is the one a
# real receiver sees (datagrams queued to a reader), not an ICMP-refused port.
"${pin_sink[@]}" python3 -u - "$work/port" "$work/received" <<'PY' &
import socket, sys
port_file, count_file = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
s.bind(("127.0.0.1", 0))
open(port_file + ".tmp", "w").write(str(s.getsockname()[1]))
import os; os.rename(port_file + ".tmp", port_file)
buf = bytearray(2048)
n = 0
s.settimeout(None)
try:
    while True:
        s.recv_into(buf)
        n += 1
        if n % 100000 == 0:
            open(count_file, "w").write(str(n))
except KeyboardInterrupt:
    pass
PY
sink_pid=$!

for _ in $(seq 1 500); do
    [ -s "$work/port" ] && break
    sleep 0.01
done
[ -s "$work/port" ] || { echo "the sink did not start" >&2; exit 1; }
port="$(cat "$work/port")"

apps_flag=()
if [ "$SCENARIO" = random ]; then apps_flag=(--apps "$APPS"); fi

"${pin_sender[@]}" "$CLIENT" run --scenario "$SCENARIO" "${apps_flag[@]}" --rate 0 --count "$COUNT" \
    --corrupt-pct "$CORRUPT_PCT" --seed 1 --to "127.0.0.1:$port" --no-progress --json >"$work/summary.json"

python3 - "$work/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"sent {s['sent']} datagrams ({s['valid']} valid, {s['corrupted']} corrupted) in "
      f"{s['elapsed_secs']:.2f} s, batches of {s['batch']}, send errors {s['send_errors']}, "
      f"retries {s['send_retries']}")
print(f"offered_rate_per_sec {s['rate_per_sec']:.0f}")
if s.get("rate_per_sec_unshared"):
    print(f"rate_per_sec_unshared {s['rate_per_sec_unshared']:.0f} "
          f"(on a CPU {s['cpu_secs']:.2f} s, waiting for one {s['cpu_wait_secs']:.2f} s)")
PY
