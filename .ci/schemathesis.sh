#!/usr/bin/env bash
# Schemathesis (`st run`) against the running service: generated requests, valid and invalid,
# for every operation in GET /openapi.json, checked for 5xx answers, answers the document does
# not describe (status, content type, body schema) and schema-violating requests accepted.
#
# The service runs in mock mode on SQLite in a temporary directory, on a free loopback port, with
# known secrets and the OTP limits raised as a load test would. Three runs: with a user token,
# with the host key and with the cron secret (each operation also meets the other two's keys).
# Any finding fails the script.
#
# Warnings do not. Two are expected: "Authentication failed" (each run holds one of the three
# keys), and "Schema validation mismatch" for send-otp, verify-otp and /dev/inbound, whose valid
# requests Schemathesis cannot write: a random number that matches the pattern is not one that
# libphonenumber knows (400 `invalid_phone`, documented), and a random code is never the live one
# (400 `invalid_otp`, documented).
#
#   .ci/schemathesis.sh      ST_MAX_EXAMPLES (default 100) cases per operation and phase, ST_SEED (8)
#
# Schemathesis comes from PyPI into a virtualenv (ST_VENV, default ~/.cache/prism-messaging/
# st-venv), installed on first use; ST_VERSION pins it.
set -euo pipefail
cd "$(dirname "$0")/.."

max_examples="${ST_MAX_EXAMPLES:-100}"
venv="${ST_VENV:-$HOME/.cache/prism-messaging/st-venv}"
st_version="${ST_VERSION:-4.32.5}"

if [ ! -x "$venv/bin/st" ] || ! "$venv/bin/st" --version | grep -qF "$st_version"; then
  echo "== installing schemathesis $st_version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$st_version"
fi

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== build"
# The binary is copied at once: a target directory shared with another checkout may get that
# checkout's binary at the same path.
cargo build --locked --quiet --bin prism-messaging --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | while read -r built; do cp "$built" "$work/prism-messaging"; done
bin="$work/prism-messaging"
[ -x "$bin" ] || { echo "no binary built"; exit 1; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"

# Known secrets; a clean environment, so nothing from the caller's .env or shell leaks in (the
# service also reads .env from its working directory: it runs in the empty temporary one).
host_key="st-host-key-0123456789abcdefghijklmnop"
cron_secret="st-cron-secret-0123456789abcdefghijklmn"
service_env=(
  env -i "PATH=$PATH" "HOME=$work"
  "BIND_ADDR=127.0.0.1:$port"
  "DATABASE_URL=sqlite://$work/schemathesis.db"
  "MESSAGING_MOCK_MODE=true"
  "MESSAGING_ENABLED=true"
  "APP_URL=http://localhost:8080"
  "MESSAGING_API_KEY=$host_key"
  "CRON_SECRET=$cron_secret"
  "AUTH_JWT_SECRET=st-jwt-secret-0123456789abcdefghijklmnopqrstuv"
  "TWILIO_AUTH_TOKEN=st-twilio-auth-token-0123456789abcdef"
  # A load test's limits: no resend cooldown, the highest hourly caps (per number, user and IP;
  # OTP_MAX_SENDS_PER_IP_PER_HOUR where the build has a separate one).
  "OTP_RESEND_COOLDOWN_SECONDS=0"
  "OTP_MAX_SENDS_PER_HOUR=1000"
  "OTP_MAX_SENDS_PER_IP_PER_HOUR=1000"
  "OTP_MAX_ATTEMPTS=100"
  "LOG_FORMAT=json"
  "RUST_LOG=warn"
)

echo "== starting the service on $base"
(cd "$work" && exec "${service_env[@]}" "$bin" serve >"$work/server.log" 2>&1) &
server_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "$base/readyz" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "the service did not start"; exit 1; }
  sleep 0.2
done
curl -fsS "$base/readyz" >/dev/null

user_token=$(cd "$work" && "${service_env[@]}" "$bin" token --user st-user --ttl 3600)

checks="not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection"
status=0
run() {
  local label=$1 secret=$2
  echo "== st run: $label"
  (cd "$work" && "$venv/bin/st" run "$base/openapi.json" \
    --checks "$checks" \
    --header "Authorization: Bearer $secret" \
    --max-examples "$max_examples" \
    --seed "${ST_SEED:-8}" \
    --workers 2 \
    --generation-database none \
    --no-color \
    --output-truncate false) || status=1
}
run "user token" "$user_token"
run "host key" "$host_key"
run "cron secret" "$cron_secret"

if grep -q '"level":"ERROR"' "$work/server.log"; then
  echo "== the service logged errors:"
  grep '"level":"ERROR"' "$work/server.log" | head -20
  status=1
fi
kill -0 "$server_pid" 2>/dev/null || { echo "the service died"; cat "$work/server.log"; status=1; }

if [ "$status" -ne 0 ]; then
  echo "== schemathesis: FAILED"
  exit 1
fi
echo "== schemathesis: no findings"
