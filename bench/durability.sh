#!/usr/bin/env bash
# Fault injection for durability (issue 14): a power cut cannot be staged here, so this traces the
# release binary's system calls (strace) and checks that every answer to a write request left only
# after an fsync of the SQLite log (the -wal file) that followed the log's last write. An answer
# that left before its data reached the disk would be lost by a power cut at that moment.
#   bench/durability.sh [users]      (builds the release binary into CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
users="${1:-200}"
command -v strace >/dev/null || { echo "needs strace (apt-get install strace)"; exit 1; }
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --bin prism-messaging
target="${CARGO_TARGET_DIR:-target}"; [[ "$target" = /* ]] || target="$(pwd)/$target"
bin="$target/release/prism-messaging"
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && pkill -P "$pid" 2>/dev/null; rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 20000))
key="prism-durability-key-0123456789abcdef"

# The API alone (no dispatcher or scheduler writing in the background), traced.
serve() {
  rm -f "$work"/prism-messaging.db*
  (cd "$work" && BIND_ADDR="127.0.0.1:$port" MESSAGING_API_KEY="$key" RUST_LOG=warn \
    INSTANCE_ROLE=api OTP_RESEND_COOLDOWN_SECONDS=0 TRUST_FORWARDED_FOR=true QUIET_HOURS=off \
    exec strace -f -y -qq -o "$work/trace-$1" \
      -e trace=pwrite64,write,writev,sendto,fdatasync,fsync "$bin" serve) &
  pid=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
}

# strace forwards no signal to its child: stop the server itself, then strace ends.
stop() { pkill -TERM -P "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; }

# Writes a caller is told about: an appointment pushed by the host app and an OTP send, per user.
load() {
  seq "$2" | xargs -P "$1" -I{} sh -c "
    n=\$(printf %05d {})
    curl -fs -o /dev/null -X PUT http://127.0.0.1:$port/api/appointments/a{} \
      -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' \
      -d '{\"user_id\": \"u{}\", \"starts_at\": \"2030-01-01T10:00:00Z\"}' || echo refused
    curl -fs -o /dev/null -X POST http://127.0.0.1:$port/api/messaging/send-otp \
      -H 'Content-Type: application/json' -H 'X-Forwarded-For: 198.18.0.{}' \
      -d '{\"user_id\": \"u{}\", \"phone_number\": \"+9198765'\$n'\", \"purpose\": \"login\"}' \
      || echo refused"
}

# One request at a time: every answer must follow an fsync of everything written before it.
serve sequential; load 1 "$users"; stop
# Sixteen at a time: requests share fsyncs (group commit). Counted, not checked: a trace cannot
# tell which request wrote what.
serve concurrent; load 16 "$users"; stop

status=0
for mode in sequential concurrent; do
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
if mode == "sequential":
    line += f"; answers sent before their writes were fsynced: {unsafe}"
print(line)
sys.exit(1 if (mode == "sequential" and unsafe) or not syncs else 0)
EOF
done
exit $status
