#!/usr/bin/env bash
# Benchmarks (not tests): builds the release binary and prints throughput and latency figures.
#   bench/run.sh [seconds] [concurrency]
# PostgreSQL runs use BENCH_DATABASE_URL's server (default postgres://postgres@127.0.0.1:5432/test)
# with a fresh database each.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
concurrency="${2:-16}"
admin="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

cargo build --release --quiet --bin prism-messaging --example bench
bench=target/release/examples/bench
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fresh_pg() {
  local name="prism_bench_$(date +%s%N)"
  psql "$admin" -qAtc "CREATE DATABASE $name" >/dev/null
  echo "${admin%/*}/$name"
}
drop_pg() { psql "$admin" -qAtc "DROP DATABASE IF EXISTS ${1##*/} WITH (FORCE)" >/dev/null; }

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
