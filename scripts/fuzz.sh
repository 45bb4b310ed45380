#!/usr/bin/env bash
# Builds dmfabric's fuzz targets (fuzz/, cargo-fuzz) and runs each from its
# committed corpus (fuzz/corpus/<target>/), saying how many inputs it ran.
#
#   scripts/fuzz.sh [--smoke | --runs N | --seconds S] [--jobs J] [target...]
#   scripts/fuzz.sh --seeds [target...]
#
#   --smoke      what ./run test runs: each target until 200,000 inputs or 20 s,
#                as many at a time as there are cores, built unoptimised (half
#                the build's time, and the run is capped by time anyway)
#   --runs N     each target for N inputs (no time limit unless --seconds too)
#   --seconds S  each target for S seconds (the default: 60)
#   --jobs J     run J targets at a time (the default: 1; each takes a core)
#   --seeds      write the seeds again from real data (fuzz/examples/seeds.rs)
#                and minimise each corpus with libFuzzer's merge (cargo fuzz
#                cmin), keeping the seeds' names; commit what changed
#   target...    some targets only (the default: all; `cargo fuzz list --fuzz-dir fuzz`)
#
# A target with a dictionary (fuzz/dict/<target>.dict: the tokens of its
# format) gets it. A crash (a panic, an allocation over the 2 GiB limit, a timeout) makes it
# exit non-zero, naming the input, kept in target/fuzz/artifacts/<target>/.
# Inputs the fuzzer finds are not kept (the committed corpus is the seeds):
# it leaves nothing behind but its build cache, target/fuzz, which makes the
# next run's build quick. Needs cargo-fuzz (scripts/setup.sh installs it);
# builds with the machine's toolchain (RUSTC_BOOTSTRAP=1 lets a stable one
# take the sanitizer flags) or DMFABRIC_FUZZ_TOOLCHAIN (e.g. nightly).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

runs=-1
seconds=
seeds=0
jobs=1
profile=release
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) runs=200000; seconds=20; jobs=$(nproc); profile=debug ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift ;;
    --runs) runs=${2:?--runs needs a number}; shift ;;
    --seconds) seconds=${2:?--seconds needs a number}; shift ;;
    --seeds) seeds=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz: unknown option $1 (see scripts/fuzz.sh --help)" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done

# Without a limit: 60 s; with a number of runs alone: no time limit.
if [ -z "$seconds" ]; then
  if [ "$runs" = -1 ]; then seconds=60; else seconds=0; fi
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is missing: run scripts/setup.sh (or cargo install cargo-fuzz --locked)" >&2
  exit 1
fi
toolchain=()
[ -n "${DMFABRIC_FUZZ_TOOLCHAIN:-}" ] && toolchain=("+$DMFABRIC_FUZZ_TOOLCHAIN")
export RUSTC_BOOTSTRAP=1

# The fuzz crate is not in the workspace: it starts from the workspace's lock
# (the versions the tests ran with) and cargo adds what only it needs.
if [ ! -f fuzz/Cargo.lock ] || [ Cargo.lock -nt fuzz/Cargo.lock ]; then
  cp Cargo.lock fuzz/Cargo.lock
fi

all=$(cargo "${toolchain[@]}" fuzz list --fuzz-dir fuzz)
[ ${#targets[@]} -gt 0 ] || read -r -a targets <<<"$(echo $all)"
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$all" || { echo "fuzz: no target $t: the targets are $(echo $all)" >&2; exit 2; }
done

target_dir=$root/target/fuzz
triple=$(rustc "${toolchain[@]}" -vV | sed -n 's/^host: //p')
bin=$target_dir/$triple/$profile
build_flags=()
[ "$profile" = debug ] && build_flags=(--dev)
artifacts=$target_dir/artifacts

# Scratch space, removed on exit: tmpfs where there is one (the records
# target syncs a store file on every input it writes).
base=${TMPDIR:-/tmp}
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
work=$(mktemp -d "$base/dmfabric-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "fuzz: building ${targets[*]} (cargo fuzz build, cache in target/fuzz)"
build_log=$work/build.log
for t in "${targets[@]}"; do
  if ! cargo "${toolchain[@]}" fuzz build "${build_flags[@]}" --fuzz-dir fuzz --target-dir "$target_dir" "$t" >>"$build_log" 2>&1; then
    grep -E '^(error|warning)' -A12 "$build_log" | head -60 >&2 || tail -40 "$build_log" >&2
    echo "fuzz: the build of $t failed" >&2
    exit 1
  fi
done

if [ "$seeds" = 1 ]; then
  echo "fuzz: writing the seeds from real data (fuzz/examples/seeds.rs)"
  cargo "${toolchain[@]}" run -q --manifest-path fuzz/Cargo.toml --target-dir "$root/target/fuzz-seeds" \
    --example seeds -- "$work/seeds"
  for t in "${targets[@]}"; do
    [ -d "$work/seeds/$t" ] || continue
    mkdir -p "$work/merged/$t" "fuzz/corpus/$t"
    # What the committed corpus and the new seeds cover, in as few inputs as
    # libFuzzer's merge keeps (what cargo fuzz cmin runs).
    "$bin/$t" -merge=1 -rss_limit_mb=2048 "$work/merged/$t" "fuzz/corpus/$t" "$work/seeds/$t" \
      >"$work/$t.merge.log" 2>&1 || { tail -20 "$work/$t.merge.log" >&2; exit 1; }
    # The merge names inputs by their SHA-1: keep the kept ones' own names
    # (a fresh seed's name over a committed copy's).
    mkdir -p "$work/named/$t"
    for f in "fuzz/corpus/$t"/* "$work/seeds/$t"/*; do
      [ -f "$f" ] || continue
      sum=$(sha1sum "$f" | cut -d' ' -f1)
      [ -f "$work/merged/$t/$sum" ] || continue
      find "$work/named/$t" -type f -exec cmp -s "$f" {} \; -delete
      cp "$f" "$work/named/$t/$(basename "$f")"
    done
    rm -rf "fuzz/corpus/$t"
    cp -r "$work/named/$t" "fuzz/corpus/$t"
    echo "fuzz: $t: $(ls "fuzz/corpus/$t" | wc -l) seeds after minimising ($(ls "$work/seeds/$t" | wc -l) written)"
  done
  exit 0
fi

limits="-runs=$runs"
[ "$seconds" != 0 ] && limits="$limits -max_total_time=$seconds"
echo "fuzz: running each target: $limits, $jobs at a time"

# One target: its report line in $work/<target>.said, its exit code in .rc.
run_one() {
  local t=$1 log=$work/$1.log start rc=0 took execs seeds_n found input
  mkdir -p "$work/found/$t" "$artifacts/$t" "fuzz/corpus/$t"
  local dict=()
  [ -f "fuzz/dict/$t.dict" ] && dict=("-dict=fuzz/dict/$t.dict")
  start=$(date +%s)
  # shellcheck disable=SC2086 # $limits is two flags
  TMPDIR=$work "$bin/$t" $limits "${dict[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/$t/" "$work/found/$t" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  took=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  execs=${execs:-$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -1)}
  seeds_n=$(find "fuzz/corpus/$t" -type f | wc -l)
  found=$(find "$work/found/$t" -type f | wc -l)
  echo "${execs:-0}" >"$work/$t.execs"
  echo "$rc" >"$work/$t.rc"
  if [ "$rc" = 0 ]; then
    echo "fuzz: $t: ${execs:-?} inputs in ${took} s from $seeds_n seeds ($found new ones not kept): no crash" >"$work/$t.said"
  else
    {
      echo "fuzz: $t: CRASH after ${execs:-?} inputs (libFuzzer exit $rc):"
      grep -E 'panicked at|ERROR: |SUMMARY' -A3 "$log" | head -30 || tail -30 "$log"
      input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
      [ -n "$input" ] && echo "fuzz: $t: the input is $input; again: $bin/$t $input"
    } >"$work/$t.said"
  fi
}

# $jobs targets at a time (each libFuzzer process takes one core), reported in order.
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_one "$t" &
  running=$((running + 1))
done
wait
failed=()
total=0
for t in "${targets[@]}"; do
  if [ "$(cat "$work/$t.rc" 2>/dev/null)" = 0 ]; then
    cat "$work/$t.said"
    total=$((total + $(cat "$work/$t.execs")))
  else
    cat "$work/$t.said" >&2 2>/dev/null || echo "fuzz: $t: did not run (see above)" >&2
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, $total inputs, no crash"
