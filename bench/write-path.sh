#!/usr/bin/env bash
# The write path (issue 14), side by side in one run: /healthz, send-otp (SQLite and PostgreSQL,
# and PostgreSQL again with a busy hour's codes logged and no statistics on them),
# a refused send-otp (the same request again, and one number from many callers), signed status
# callbacks, against the guide's own stack (Flask + SQLite, ../shared/bench/seed-stack) under the
# same wrk load, with this service's resident memory; and consent changes made one after another
# beside a send-otp load (bench/consent-beside-load.py: how long a pool write waits for SQLite's
# write lock while the writer thread is busy); and the floor under a durable send-otp on this
# machine (examples/durable_floor.rs: a JSON body appended as one row through group commit and
# nothing else, with 0, 1, 3 and 7 index entries under random keys per request, with rows of
# about a code's size, and with the 7 entries in a second file that is never synced); and how long one small write takes to be made durable on this disk, beside
# the time per request that 10x the guide's stack leaves at this many connections.
#   bench/write-path.sh [seconds] [connections]     (needs wrk; builds the release binary)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-8}"
connections="${2:-16}"
admin="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
seed="${SEED_STACK:-../shared/bench/seed-stack}"
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 1; }
source bench/cpu.sh
cargo build --release --quiet --bin prism-messaging --example durable_floor
target="${CARGO_TARGET_DIR:-target}"; [[ "$target" = /* ]] || target="$(pwd)/$target"
bin="$target/release/prism-messaging"
floor="$target/release/examples/durable_floor"
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
token="bench-twilio-auth-token-0123456789"
jwt_secret="bench-jwt-secret-0123456789abcdef0123"
key=$(head -c 32 /dev/urandom | base64)

# wrk NAME URL [SCRIPT]: one line of figures; the requests/s also go to $work/NAME.
measure() {
  local out rps p50 p99 non2xx
  # The previous run's dirty pages (the guide's stack writes with synchronous=normal) go to disk
  # first, so the kernel's writeback does not land on this run's fsyncs.
  sync; sleep 1
  local before after
  before=$(cpu_now)
  out=$(wrk -t2 -c"$connections" -d"${seconds}s" --latency ${3:+-s "$3"} "$2")
  after=$(cpu_now)
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  echo "$rps" >"$work/$1"
  printf '%-34s %10s req/s   p50 %8s   p99 %8s   non-2xx %-7s %s\n' "$1" "$rps" "$p50" "$p99" \
    "${non2xx:-0}" "$(cpu_use "$before" "$after")"
}

ratio() { python3 -c "print(f'{float(\"$(cat "$work/$1")\") / float(\"$(cat "$work/$2")\"):.2f}')"; }

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
peak_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

# The service in mock mode on DATABASE_URL, on PORT.
serve() {
  (cd "$work" && exec env BIND_ADDR="127.0.0.1:$2" DATABASE_URL="$1" DATA_ENCRYPTION_KEY="$key" \
    TWILIO_AUTH_TOKEN="$token" AUTH_JWT_SECRET="$jwt_secret" PUBLIC_URL="http://127.0.0.1:$2" RUST_LOG=warn \
    OTP_RESEND_COOLDOWN_SECONDS=0 TRUST_FORWARDED_FOR=true QUIET_HOURS=off "$bin" serve \
    >"$work/serve-$2.log" 2>&1) &
  pids+=($!)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$2/healthz" >/dev/null && return; sleep 0.1; done
  echo "the service did not start"; exit 1
}

echo "== write path, ${seconds}s per run, $connections connections, wrk -t2, $(nproc) cores"
"$seed/run.sh" 8777 >"$work/seed.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do curl -fs -o /dev/null http://127.0.0.1:8777/ 2>/dev/null && break
  grep -q "Listening at" "$work/seed.log" 2>/dev/null && break; sleep 0.2; done
sleep 1

serve "sqlite://$work/bench.db" 8780
# `exec env ... serve` in the subshell: its PID is the server's.
server_pid=${pids[-1]}
sleep 1
idle=$(rss_kib "$server_pid")

# Signed status callbacks for SIDs no message has (each stored durably as unmatched): a wrk
# script with a few thousand requests signed in advance.
python3 - "$token" "http://127.0.0.1:8780/webhooks/twilio/status" >"$work/status.lua" <<'EOF'
import base64, hashlib, hmac, sys, urllib.parse
token, url = sys.argv[1], sys.argv[2]
print("local reqs = {}")
for i in range(5000):
    params = {"MessageSid": f"SM{i:032x}", "MessageStatus": "delivered"}
    data = url + "".join(k + params[k] for k in sorted(params))
    sig = base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()
    body = urllib.parse.urlencode(params)
    print(f'reqs[{i + 1}] = wrk.format("POST", "/webhooks/twilio/status", '
          f'{{["Content-Type"] = "application/x-www-form-urlencoded", '
          f'["X-Twilio-Signature"] = "{sig}"}}, "{body}")')
print("local n = 0")
print("request = function() n = n + 1; return reqs[(n % #reqs) + 1] end")
EOF

measure "healthz (this service)" http://127.0.0.1:8780/healthz
measure "send-otp, guide's stack (SQLite)" http://127.0.0.1:8777 ../shared/bench/send-otp.lua
measure "send-otp, SQLite" http://127.0.0.1:8780 ../shared/bench/send-otp.lua
measure "send-otp refused (429), SQLite" http://127.0.0.1:8780 bench/send-otp-refused.lua
# One number named by a new user from a new address every time (refused by the number's hour).
measure "refused, one number, many callers" http://127.0.0.1:8780 bench/send-otp-one-number.lua
measure "status callbacks, SQLite" http://127.0.0.1:8780 "$work/status.lua"
# A patient's consent change (a pool write, as a STOP is) while codes keep the writer thread busy:
# how long it waits for SQLite's write lock.
sync; sleep 1
wrk -t2 -c"$connections" -d"$((seconds + 2))s" -s ../shared/bench/send-otp.lua \
  http://127.0.0.1:8780 >/dev/null &
load=$!
sleep 1
printf '%-34s %s\n' "consent changes beside send-otp" \
  "$(python3 bench/consent-beside-load.py http://127.0.0.1:8780 "$seconds" "$jwt_secret")"
wait "$load"
peak=$(peak_kib "$server_pid")
# From here only the service measured runs: the guide's stack and the SQLite service (with the
# codes of the runs above in its file) stop.
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
pids=()
sleep 1

pg="prism_bench_$(date +%s%N)"
psql "$admin" -qAtc "CREATE DATABASE $pg" >/dev/null
serve "${admin%/*}/$pg" 8781
measure "send-otp, PostgreSQL" http://127.0.0.1:8781 ../shared/bench/send-otp.lua
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
pids=()
sleep 1
# The same with 200,000 codes logged in the last hour (a busy platform's rate-limit window) and
# no statistics on them, as on a database whose autovacuum is off or behind: the planner's
# estimates for the limits' probes grow with the table, and so did the time it spent compiling
# them (JIT) at every call, before the service turned JIT off. A new service, so its sessions
# plan on the grown table.
psql "${admin%/*}/$pg" -qAtc "INSERT INTO otp_send_log (phone_number, user_id, ip, created_at,
    phone_index, went_to_named) SELECT 'enc1:bench:' || md5(i::text), 'logged-' || i,
    '10.' || (i % 250) || '.' || (i / 250 % 250) || '.' || (i / 62500),
    now() - (i % 3000) * INTERVAL '1 second', encode(sha256(i::text::bytea), 'hex'), TRUE
    FROM generate_series(1, 200000) AS i" >/dev/null
serve "${admin%/*}/$pg" 8781
measure "send-otp, PostgreSQL, grown log" http://127.0.0.1:8781 ../shared/bench/send-otp.lua
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
pids=()
sleep 1
psql "$admin" -qAtc "DROP DATABASE IF EXISTS $pg WITH (FORCE)" >/dev/null

# The floor: what the same load gets from the least a durable write through SQLite can do here,
# what each index entry under a random key takes from it, and what rows of about a code's size
# take (a code's rows and entries come to about 2.2 KB in the file; 1,500 bytes of row take about
# 2 KB of it, two rows to a 4 KiB page).
floor_runs=("0 random keys:0 0" "1 random keys:1 0" "3 random keys:3 0" "7 random keys:7 0"
  "2 KB rows:0 1500" "7 keys, unsynced file:7 0 side" "7 keys unsynced, 2 KB:7 1500 side")
for run in "${floor_runs[@]}"; do
  name="durable floor, ${run%%:*}"
  read -r keys row_bytes side <<<"${run#*:}"
  "$floor" "$work/floor.db" 8782 "$keys" "$row_bytes" $side >"$work/floor.log" 2>&1 &
  floor_pid=$!
  pids=("$floor_pid")
  for _ in $(seq 100); do
    curl -fs -o /dev/null --max-time 2 -X POST -H 'Content-Type: application/json' -d '{}' \
      http://127.0.0.1:8782/api/messaging/send-otp && break
    kill -0 "$floor_pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! curl -fs -o /dev/null --max-time 2 -X POST -H 'Content-Type: application/json' -d '{}' \
      http://127.0.0.1:8782/api/messaging/send-otp; then
    echo "the durable floor did not start:"; cat "$work/floor.log"; exit 1
  fi
  measure "$name" http://127.0.0.1:8782 ../shared/bench/send-otp.lua
  kill "$floor_pid" 2>/dev/null || true
  wait "$floor_pid" 2>/dev/null || true
  pids=()
  rm -f "$work/floor.db"*
done

# The disk's own share: one small write made durable (bench/fsync-latency.py), measured with nothing else running. Each of
# the connections has one request in flight, so N connections at R requests/s leave N / R seconds
# per request (Little's law), the fsync it waits for included.
sync; sleep 1
read -r fsync_p50 fsync_p99 < <(python3 bench/fsync-latency.py "$work" 2000)

echo "-- ratios (same run)"
echo "send-otp SQLite / guide's stack:      $(ratio "send-otp, SQLite" "send-otp, guide's stack (SQLite)")  (goal >= 10)"
echo "refused send-otp / healthz:           $(ratio "send-otp refused (429), SQLite" "healthz (this service)")  (goal >= 0.25)"
echo "refused, one number / healthz:        $(ratio "refused, one number, many callers" "healthz (this service)")"
echo "send-otp SQLite / healthz:            $(ratio "send-otp, SQLite" "healthz (this service)")  (aim 0.33)"
echo "status callbacks / healthz:           $(ratio "status callbacks, SQLite" "healthz (this service)")  (goal >= 0.25)"
for run in "${floor_runs[@]}"; do
  name="durable floor, ${run%%:*}"
  printf '%-40s%s\n' "$name / guide:" "$(ratio "$name" "send-otp, guide's stack (SQLite)")"
done
echo "one 4 KiB write + fdatasync here:     median $fsync_p50 ms, p99 $fsync_p99 ms (idle machine)"
echo "10x the guide's stack at $connections connections leaves $(python3 -c "print(f'{$connections * 1000 / (10 * float(\"$(cat "$work/send-otp, guide's stack (SQLite)")\")):.3f}')") ms per request, its fsync included"
echo "send-otp PostgreSQL:                  $(cat "$work/send-otp, PostgreSQL") req/s  (goal >= 5000)"
echo "send-otp PostgreSQL, grown log:       $(cat "$work/send-otp, PostgreSQL, grown log") req/s  (200,000 codes logged this hour, no statistics)"
echo "-- memory (SQLite run): idle $((idle / 1024)) MiB resident, peak under load $((peak / 1024)) MiB  (goals < 30, < 100)"
