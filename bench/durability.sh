#!/usr/bin/env bash
# Fault injection for durability (issue 14): a power cut cannot be staged here, so this traces the
# release binary's system calls (strace) and checks that every answer to a write request left only
# after an fsync of the SQLite log (the -wal file) that followed the log's last write. An answer
# that left before its data reached the disk would be lost by a power cut at that moment. The writes
# (bench/durability-load.py, per patient): a consent change, a queued message, an appointment, a
# code and a STOP. After each run the database file is checked for every one of them. A third run
# names the database through a symbolic link (SQLite keeps the log beside the file the link leads
# to, and that log is the one that must be fsynced).
#   bench/durability.sh [users]      (builds the release binary into CARGO_TARGET_DIR;
#                                     PRISM_BIN=path checks that binary instead, built by you)
set -euo pipefail
cd "$(dirname "$0")/.."
users="${1:-200}"
command -v strace >/dev/null || { echo "needs strace (apt-get install strace)"; exit 1; }
[ -n "${NO_BUILD:-}${PRISM_BIN:-}" ] || cargo build --release --quiet --bin prism-messaging
target="${CARGO_TARGET_DIR:-target}"; [[ "$target" = /* ]] || target="$(pwd)/$target"
bin="${PRISM_BIN:-$target/release/prism-messaging}"; [[ "$bin" = /* ]] || bin="$(pwd)/$bin"
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && { pkill -KILL -P "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }; rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 20000))
# The secrets bench/durability-load.py signs its requests with.
key="prism-durability-key-0123456789abcdef"
jwt_secret="prism-durability-jwt-secret-0123456789"
twilio_token="prism-durability-twilio-token-0123456789"

# The API alone (no dispatcher or scheduler writing in the background), traced; DATABASE_URL $2
# if given (the default: prism-messaging.db in $work).
serve() {
  rm -f "$work"/prism-messaging.db*
  (cd "$work" && DATABASE_URL="${2:-sqlite://$work/prism-messaging.db}" BIND_ADDR="127.0.0.1:$port" MESSAGING_API_KEY="$key" RUST_LOG=warn \
    AUTH_JWT_SECRET="$jwt_secret" TWILIO_AUTH_TOKEN="$twilio_token" \
    PUBLIC_URL="http://127.0.0.1:$port" INSTANCE_ROLE=api OTP_RESEND_COOLDOWN_SECONDS=0 \
    TRUST_FORWARDED_FOR=true QUIET_HOURS=off \
    exec strace -f -y -qq -o "$work/trace-$1" \
      -e trace=pwrite64,write,writev,sendto,fdatasync,fsync "$bin" serve) &
  pid=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  # Up, and ours (not another process on a taken port while ours failed to bind).
  if ! curl -fs "http://127.0.0.1:$port/healthz" >/dev/null || ! kill -0 "$pid" 2>/dev/null; then
    echo "the service did not start on port $port"; exit 1
  fi
}

# Kill the server (SIGKILL, right after its last answer: no shutdown work of its own), then
# strace ends. What it had written is in the kernel's page cache, so the file check below shows
# every acknowledged write was made; the trace shows each was fsynced before its answer.
stop() { pkill -KILL -P "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; }

# What the file holds once the server was killed: every acknowledged write of the run, by kind.
# (That they were made; the trace below shows they were on disk before their answers.)
check_file() {
  python3 - "${2:-$work/prism-messaging.db}" "$users" "$1" <<'EOF'
import sqlite3, sys
path, users, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
db = sqlite3.connect(path)
# Each kind counted once per patient, so each must come to exactly the number of patients.
counts = {
    "consent changes": "SELECT count(DISTINCT user_id) FROM consent_audit_trail "
                       "WHERE field = 'sms_consent' AND source = 'app_settings'",
    "queued messages": "SELECT count(*) FROM messages WHERE template_name = 'payment_received'",
    "appointments": "SELECT count(*) FROM appointments",
    "codes": "SELECT count(*) FROM otp_codes",
    "STOPs (opt-outs)": "SELECT count(*) FROM opt_outs WHERE source = 'sms_keyword'",
    "STOPs (consent revoked)": "SELECT count(DISTINCT user_id) FROM consent_audit_trail "
                               "WHERE field = 'sms_consent' AND source = 'sms_keyword'",
}
found = {kind: db.execute(sql).fetchone()[0] for kind, sql in counts.items()}
short = [kind for kind, n in found.items() if n != users]
print(f"{mode}: in the file after the run: " + ", ".join(f"{n} {k}" for k, n in found.items()))
sys.exit(1 if short else 0)
EOF
}

status=0
# One request at a time: every answer must follow an fsync of everything written before it.
serve sequential; python3 bench/durability-load.py "$port" "$users" 1; stop
check_file sequential || status=1
# Sixteen at a time: requests share fsyncs (group commit). Counted, not checked: a trace cannot
# tell which request wrote what.
serve concurrent; python3 bench/durability-load.py "$port" "$users" 16; stop
check_file concurrent || status=1
# One at a time again, the database named through a link to a file in another directory.
mkdir -p "$work/data"
rm -f "$work/data/real.db"*
: >"$work/data/real.db"
ln -sf "$work/data/real.db" "$work/linked.db"
serve linked "sqlite://$work/linked.db"; python3 bench/durability-load.py "$port" "$users" 1; stop
check_file linked "$work/data/real.db" || status=1

for mode in sequential concurrent linked; do
  python3 - "$work/trace-$mode" "$mode" <<'EOF' || status=1
import re, sys
path, mode = sys.argv[1], sys.argv[2]
dirty = False        # the log was written since its last fsync
answers = unsafe = syncs = wal_writes = 0
for line in open(path):
    m = re.match(r"\s*\d+\s+(\w+)\(\d+<([^>]*)>", line)
    if not m:
        continue
    call, target = m.groups()
    if target.endswith("-wal"):
        if call == "pwrite64":
            dirty, wal_writes = True, wal_writes + 1
        elif call in ("fdatasync", "fsync"):
            dirty, syncs = False, syncs + 1
    elif ("TCP" in target or "socket" in target) and call in ("write", "writev", "sendto"):
        if "HTTP/1.1 " in line:
            answers += 1
            if dirty and "HTTP/1.1 2" in line:
                unsafe += 1
line = (f"{mode}: {answers} answers, {wal_writes} writes to the log, {syncs} fsyncs of the log, "
        f"{answers / max(syncs, 1):.1f} answers per fsync")
one_at_a_time = mode in ("sequential", "linked")
if one_at_a_time:
    line += f"; answers sent before their writes were fsynced: {unsafe}"
print(line)
sys.exit(1 if (one_at_a_time and unsafe) or not syncs else 0)
EOF
done
exit $status
