#!/usr/bin/env bash
# Benchmarks (not tests): builds the release binary and prints throughput and latency figures.
#   bench/run.sh [seconds] [concurrency]     HTTP (healthz, OTP) and dispatch
#   bench/run.sh --reminders                 reminder sweeps at scale and the CSV import
# PostgreSQL runs use BENCH_DATABASE_URL's server (default postgres://postgres@127.0.0.1:5432/test)
# with a fresh database each. Builds into CARGO_TARGET_DIR (default target).
set -euo pipefail
cd "$(dirname "$0")/.."
reminders=false
if [ "${1:-}" = "--reminders" ]; then
  reminders=true
  shift
fi
seconds="${1:-10}"
concurrency="${2:-16}"
admin="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

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

if $reminders; then
  # Appointments stored (a tenth due for their 24-hour reminder), and rows imported.
  sizes="${BENCH_SWEEP_SIZES:-10000 100000 1000000}"
  rows="${BENCH_IMPORT_ROWS:-100000}"
  echo "== prism-messaging reminder benchmarks: sweeps over $sizes appointments, import of $rows rows, $(nproc) cores"
  for size in $sizes; do
    "$bench" sweep "sqlite://$work/sweep-$size.db" "$size"
    rm -f "$work/sweep-$size.db"*
    url=$(fresh_pg); "$bench" sweep "$url" "$size"; drop_pg "$url"
  done
  "$bench" import "sqlite://$work/import.db" "$rows"
  url=$(fresh_pg); "$bench" import "$url" "$rows"; drop_pg "$url"
  exit 0
fi

echo "== prism-messaging benchmarks: ${seconds}s per run, $concurrency concurrent clients, $(nproc) cores"
for scenario in healthz otp; do
  "$bench" "$scenario" "sqlite://$work/$scenario.db" "$seconds" "$concurrency"
  url=$(fresh_pg); "$bench" "$scenario" "$url" "$seconds" "$concurrency"; drop_pg "$url"
done

messages="${BENCH_MESSAGES:-5000}"
"$bench" dispatch "sqlite://$work/dispatch.db" "$messages" 1
for instances in 1 2; do
  url=$(fresh_pg); "$bench" dispatch "$url" "$messages" "$instances"; drop_pg "$url"
done
