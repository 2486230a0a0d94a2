#!/usr/bin/env bash
# Benchmarks (not tests): builds the release binary and prints every figure of issue 14, each
# beside what it is measured against in the same run.
#   bench/run.sh [seconds] [concurrency]   everything: the write path (bench/write-path.sh:
#                                          /healthz, the guide's stack, send-otp on SQLite and
#                                          PostgreSQL, a refused send, status callbacks, memory),
#                                          dispatch (SQLite, PostgreSQL with one and two
#                                          instances, and paced), the reminder sweeps and import
#                                          and the durability check (bench/durability.sh)
#   bench/run.sh --write-path | --dispatch | --reminders | --durability | --http [seconds] [concurrency]
#                                          one part (--http: the older in-process OTP client)
# Needs wrk for the write path. PostgreSQL runs use BENCH_DATABASE_URL's server (default
# postgres://postgres@127.0.0.1:5432/test) with a fresh database each. Builds into
# CARGO_TARGET_DIR (default target).
set -euo pipefail
cd "$(dirname "$0")/.."
part=all
case "${1:-}" in
  --write-path|--dispatch|--reminders|--durability|--http) part="${1#--}"; shift ;;
esac
seconds="${1:-10}"
concurrency="${2:-16}"
admin="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

source bench/cpu.sh
cargo build --release --quiet --bin prism-messaging --example bench
target="${CARGO_TARGET_DIR:-target}"
bench="$target/release/examples/bench"
export PRISM_BIN="$target/release/prism-messaging"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fresh_pg() {
  local name="prism_bench_$(date +%s%N)"
  psql "$admin" -qAtc "CREATE DATABASE $name" >/dev/null
  echo "${admin%/*}/$name"
}
drop_pg() { psql "$admin" -qAtc "DROP DATABASE IF EXISTS ${1##*/} WITH (FORCE)" >/dev/null; }

if [ "$part" = all ] || [ "$part" = write-path ]; then
  bench/write-path.sh "$seconds" "$concurrency"
fi

if [ "$part" = http ]; then
  echo "== prism-messaging HTTP benchmarks: ${seconds}s per run, $concurrency concurrent clients, $(nproc) cores"
  for scenario in healthz otp; do
    "$bench" "$scenario" "sqlite://$work/$scenario.db" "$seconds" "$concurrency"
    url=$(fresh_pg); "$bench" "$scenario" "$url" "$seconds" "$concurrency"; drop_pg "$url"
  done
fi

if [ "$part" = all ] || [ "$part" = dispatch ]; then
  # Messages queued, then the service started against a loopback fake Twilio: how fast they
  # leave, the per-sender rate limit off (the goal: 5,000 msg/s; two instances at least one's).
  messages="${BENCH_MESSAGES:-20000}"
  echo "== dispatch: $messages messages, per-sender rate limit off, $(nproc) cores"
  rm -f "$work/dispatch.db"*
  with_cpu "$bench" dispatch "sqlite://$work/dispatch.db" "$messages" 1
  for instances in 1 2; do
    url=$(fresh_pg); with_cpu "$bench" dispatch "$url" "$messages" "$instances"; drop_pg "$url"
  done
  # With the limit on: two instances share one sender's rate through the database, so the
  # first-to-last rate must not exceed it.
  rate="${BENCH_RATE:-100}"
  echo "== dispatch paced: DISPATCH_RATE_PER_SECOND=$rate, $((rate * 5)) messages, two instances (PostgreSQL)"
  url=$(fresh_pg)
  BENCH_DISPATCH_RATE_PER_SECOND="$rate" "$bench" dispatch "$url" "$((rate * 5))" 2
  drop_pg "$url"
fi

if [ "$part" = all ] || [ "$part" = reminders ]; then
  # Appointments stored (a tenth due for their 24-hour reminder), and rows imported.
  sizes="${BENCH_SWEEP_SIZES:-10000 100000 1000000}"
  rows="${BENCH_IMPORT_ROWS:-100000}"
  echo "== reminders: sweeps over $sizes appointments, import of $rows rows, $(nproc) cores"
  for size in $sizes; do
    "$bench" sweep "sqlite://$work/sweep-$size.db" "$size"
    rm -f "$work/sweep-$size.db"*
    url=$(fresh_pg); "$bench" sweep "$url" "$size"; drop_pg "$url"
  done
  "$bench" import "sqlite://$work/import.db" "$rows"
  url=$(fresh_pg); "$bench" import "$url" "$rows"; drop_pg "$url"
fi

if [ "$part" = all ] || [ "$part" = durability ]; then
  NO_BUILD=1 bench/durability.sh
fi
