#!/usr/bin/env bash
# Record a running dmfabric process (or a command) with perf and render a
# flamegraph SVG. Installs perf (linux-perf) and inferno when missing.
#
#   perf-scripts/flamegraph.sh --pid PID [--seconds 10] [--out flame.svg]
#   perf-scripts/flamegraph.sh [--out flame.svg] -- target/release/dmfabric bench rtt --transport xdp
#
# Records all CPUs (-a) so that the kernel's share of the data path (veth,
# XDP, softirq on the sender's core) shows up next to dmfabric's own.
set -euo pipefail
pid="" seconds=10 out="flame.svg" freq=4999
while [ $# -gt 0 ]; do
  case "$1" in
    --pid) pid=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --freq) freq=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "flamegraph: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$pid" ] && [ $# -eq 0 ]; then
  echo "flamegraph: give --pid PID or -- COMMAND ..." >&2
  exit 2
fi

if ! command -v perf >/dev/null; then
  echo "flamegraph: installing linux-perf"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
fi
if ! command -v inferno-flamegraph >/dev/null; then
  echo "flamegraph: installing inferno (cargo install, once)"
  cargo install --quiet --locked inferno
fi
export PATH="$HOME/.cargo/bin:$PATH"

data=$(mktemp /tmp/dmfabric-perf.XXXXXX.data)
trap 'rm -f "$data" "$data.old"' EXIT
if [ -n "$pid" ]; then
  kill -0 "$pid" 2>/dev/null || { echo "flamegraph: no process $pid" >&2; exit 1; }
  echo "flamegraph: recording all CPUs for ${seconds}s while pid $pid runs"
  perf record -F "$freq" -a -g -o "$data" -- sleep "$seconds" 2>/dev/null
else
  echo "flamegraph: recording all CPUs while running: $*"
  perf record -F "$freq" -a -g -o "$data" -- "$@"
fi
perf script -i "$data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --title "dmfabric $(date -u +%FT%TZ)" > "$out"
echo "flamegraph: wrote $out ($(wc -c < "$out") bytes)"
