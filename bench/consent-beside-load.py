"""Consent changes (PUT /api/messaging/preferences, each a new patient with the patient's own
token) one after another for SECONDS against BASE: how many, and their latencies. bench/write-path.sh
runs it beside a send-otp load, where these pool writes meet the SQLite writer thread's batches.

    python3 bench/consent-beside-load.py BASE SECONDS JWT_SECRET
"""
import base64
import hashlib
import hmac
import json
import sys
import time
import urllib.request


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def user_token(secret: str, user_id: str) -> str:
    """An HS256 token for AUTH_JWT_SECRET, as the host app's sign-in would issue."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"sub": user_id, "exp": int(time.time()) + 3600}).encode())
    signature = hmac.new(secret.encode(), f"{header}.{claims}".encode(), hashlib.sha256)
    return f"{header}.{claims}.{b64url(signature.digest())}"


def main() -> None:
    base, seconds, secret = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    latencies, failures, n = [], 0, 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        n += 1
        body = json.dumps({"phone_number": f"+1415556{n % 10000:04d}", "sms_consent": True})
        request = urllib.request.Request(
            f"{base}/api/messaging/preferences",
            data=body.encode(),
            method="PUT",
            headers={
                "Authorization": f"Bearer {user_token(secret, f'consent-bench-{n}')}",
                "Content-Type": "application/json",
            },
        )
        began = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                answer.read()
        except Exception:  # a refusal or a timeout counts as a failure, never as a fast answer
            failures += 1
        latencies.append(time.monotonic() - began)
    elapsed = time.monotonic() - start
    latencies.sort()
    ms = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1000
    print(f"{len(latencies) / elapsed:8.1f} /s   p50 {ms(0.5):6.1f} ms   p99 {ms(0.99):6.1f} ms   "
          f"max {latencies[-1] * 1000:6.1f} ms   failures {failures}")


if __name__ == "__main__":
    main()
