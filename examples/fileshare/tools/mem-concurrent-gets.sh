#!/usr/bin/env bash
# Peak memory of the hub under concurrent transfers (a measurement by hand, not a test).
#
# Starts a hub and an exporter "bob" with a random 256 MiB file, then N scripted readers that
# each `get` it through the hub at the same time; prints the peak RSS (VmHWM) of the hub and the
# exporter, a reader's VmHWM sampled mid-transfer, the wall time, and checks every copy.
#   N=8        readers (default 8; the hub forwards at most 8 reads to one peer at a time)
#   STALL=1    stop (SIGSTOP) the readers for 3 s mid-transfer, so the hub holds all that flow
#              control lets it, and print its RSS then
#   SHARE=...  the binary (default: the release build under $CARGO_TARGET_DIR or ./target)
#   PORT=...   loopback port (default 28766)
# Build first: cargo build --release -p fileshare --bin share
set -euo pipefail

repo="$(cd "$(dirname "$0")/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
share="${SHARE:-$target/release/share}"
n="${N:-8}"
port="${PORT:-28766}"
addr="127.0.0.1:$port"
[ -x "$share" ] || { echo "no $share: build it first (see the header)" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/share-mem.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/bob" "$work/out"
head -c $((256 << 20)) /dev/urandom > "$work/bob/big.bin"
"$share" hub --listen "$addr" > "$work/hub.log" 2>&1 & hub=$!; pids+=("$hub")
sleep 0.3
"$share" --name bob --root "$work/bob" --serve "$addr" 2> "$work/bob.log" & bob=$!; pids+=("$bob")
sleep 0.5

hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
start=$(date +%s.%N)
readers=()
for i in $(seq 1 "$n"); do
  mkdir -p "$work/r$i"
  echo "get bob big.bin $work/out/$i.bin" > "$work/cmd$i"
  "$share" --name "r$i" --root "$work/r$i" "$addr" < "$work/cmd$i" > "$work/r$i.out" 2>&1 &
  readers+=($!); pids+=($!)
done
if [ "${STALL:-0}" = 1 ]; then
  sleep 1
  kill -STOP "${readers[@]}"
  sleep 3
  echo "hub VmRSS with the readers stopped: $(awk '/VmRSS/ {print $2}' "/proc/$hub/status") kB"
  kill -CONT "${readers[@]}"
fi
reader_hwm=0
for p in "${readers[@]}"; do
  v=$(hwm "$p"); [ "${v:-0}" -gt "$reader_hwm" ] && reader_hwm=$v
done
failed=0
for p in "${readers[@]}"; do wait "$p" || failed=$((failed + 1)); done
end=$(date +%s.%N)
echo "hub VmHWM: $(hwm "$hub") kB"
echo "exporter VmHWM: $(hwm "$bob") kB"
echo "largest reader VmHWM (sampled mid-transfer): $reader_hwm kB"
echo "wall time: $(echo "$end - $start" | bc) s for $n x 256 MiB; failed readers: $failed"
for i in $(seq 1 "$n"); do
  cmp -s "$work/bob/big.bin" "$work/out/$i.bin" || { echo "copy $i differs" >&2; failed=1; }
done
[ "$failed" = 0 ]
