#!/usr/bin/env python3
"""The writes bench/durability.sh checks, per patient: every kind of write issue 14 names as one a
power cut must not lose once it is acknowledged, and two more on the hot path.

  durability-load.py PORT USERS CONCURRENCY

For patient i, in this order: a consent change (PUT preferences, the patient's own token), a queued
message (POST /api/notifications, the host app), an appointment (PUT, the host app), a code
(send-otp), and a STOP from the patient's number (the signed incoming webhook). Every answer must
be a success: a refusal would leave nothing to check, so the run fails instead. Standard library
only; the secrets are the ones durability.sh starts the service with.
"""
import base64
import hashlib
import hmac
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

API_KEY = "prism-durability-key-0123456789abcdef"
JWT_SECRET = "prism-durability-jwt-secret-0123456789"
TWILIO_TOKEN = "prism-durability-twilio-token-0123456789"
CLINIC_NUMBER = "+15005550006"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def user_token(user_id: str) -> str:
    """An HS256 token for AUTH_JWT_SECRET, as the host app's sign-in would issue."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"sub": user_id, "exp": int(time.time()) + 3600}).encode())
    signature = hmac.new(JWT_SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256)
    return f"{header}.{claims}.{b64url(signature.digest())}"


def twilio_signature(url: str, form: dict) -> str:
    """Twilio's X-Twilio-Signature: the URL, then each parameter's name and value, sorted."""
    signed = url + "".join(name + form[name] for name in sorted(form))
    digest = hmac.new(TWILIO_TOKEN.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def call(base, method, path, headers, body=None, form=None):
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    else:
        data = json.dumps(body).encode()
        headers = {**headers, "Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
    except urllib.error.HTTPError as error:
        raise SystemExit(f"{method} {path}: {error.code} {error.read()[:200]!r}") from None
    except urllib.error.URLError as error:
        raise SystemExit(f"{method} {path}: the service did not answer ({error.reason})") from None


def patient(base: str, i: int) -> None:
    user, number = f"u{i}", f"+9198765{i:05d}"
    host = {"Authorization": f"Bearer {API_KEY}"}
    call(base, "PUT", "/api/messaging/preferences",
         {"Authorization": f"Bearer {user_token(user)}"},
         {"phone_number": number, "sms_consent": True})
    call(base, "POST", "/api/notifications", host,
         {"user_id": user, "template": "payment_received",
          "variables": {"amount": "INR 499.00", "date": "2030-01-01"}})
    call(base, "PUT", f"/api/appointments/a{i}", host,
         {"user_id": user, "starts_at": "2030-01-01T10:00:00Z"})
    call(base, "POST", "/api/messaging/send-otp", {"X-Forwarded-For": f"198.18.{i // 256}.{i % 256}"},
         {"user_id": user, "phone_number": number, "purpose": "login"})
    form = {"MessageSid": f"SM{i:032x}", "AccountSid": "AC" + "0" * 32, "From": number,
            "To": CLINIC_NUMBER, "Body": "STOP"}
    path = "/webhooks/twilio/incoming"
    call(base, "POST", path, {"X-Twilio-Signature": twilio_signature(base + path, form)}, form=form)


def main() -> None:
    port, users, concurrency = (int(arg) for arg in sys.argv[1:4])
    base = f"http://127.0.0.1:{port}"
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        # list(): a worker's failure (SystemExit) is raised here, in the main thread.
        list(pool.map(lambda i: patient(base, i), range(1, users + 1)))


if __name__ == "__main__":
    main()
