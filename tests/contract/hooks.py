"""Schemathesis hooks for seckill's contract fuzzing (run by scripts/contract).

Half of the generated sale and item ids are replaced by those of a real, open sale made when
this module loads, so purchases and sale reads reach the engine's core logic (and their 201 and
200 answers are checked against the schema) instead of only ever meeting 404.

Each operation gets the credentials its security scheme documents, through schemathesis's auth
providers (so its own auth checks can still take them away): the admin token on /v1/admin/* and
/metrics, a user token (HS256, minted here) for the user the request names (else user 42), and
for the payment callback a Seckill-Signature over exactly the bytes that go out. The secrets come
from the environment (SECKILL_ADMIN_TOKEN, SECKILL_USER_TOKEN_SECRET, SECKILL_PAYMENT_SECRET).

At exit it prints how many requests reached a 2xx answer, per operation (CONTRACT_ALL=1: every
status), so a run that only ever met 401 or 404 is visible at a glance.
"""

import base64
import datetime
import hashlib
import hmac
import json
import os
import random
import time
import atexit
import collections
import urllib.request
import zlib

import schemathesis

ADMIN = os.environ["SECKILL_ADMIN_TOKEN"]
USER_SECRET = os.environ["SECKILL_USER_TOKEN_SECRET"].encode()
PAYMENT_SECRET = os.environ["SECKILL_PAYMENT_SECRET"].encode()
MAX_ID = 2**63 - 1
BASE = os.environ["CONTRACT_URL"]


def make_sale() -> tuple[int, list[int]]:
    now = datetime.datetime.now(datetime.timezone.utc)
    items = [random.SystemRandom().randint(10**9, 10**12) for _ in range(3)]
    body = {
        "name": "contract fuzzing",
        "starts_at": (now - datetime.timedelta(minutes=1)).isoformat(),
        "ends_at": (now + datetime.timedelta(hours=1)).isoformat(),
        "items": [
            {"item_id": i, "stock": 1_000_000, "price_cents": 100, "per_user_limit": 1000}
            for i in items
        ],
    }
    request = urllib.request.Request(
        f"{BASE}/v1/admin/sales",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["sale_id"], items


SALE, ITEMS = make_sale()


@schemathesis.hook
def map_path_parameters(ctx, path_parameters):
    # Decided by the generated value itself, not by `random`: Hypothesis reseeds the global
    # random generator for every example, so random.random() would answer the same each time.
    pick = zlib.crc32(repr(sorted(path_parameters.items())).encode()) if path_parameters else 1
    if path_parameters and "sale_id" in path_parameters and pick % 2 == 0:
        path_parameters["sale_id"] = SALE
        if "item_id" in path_parameters:
            path_parameters["item_id"] = ITEMS[pick // 2 % len(ITEMS)]
    return path_parameters


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def user_token(user: int) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": str(user), "exp": int(time.time()) + 3600}).encode())
    signing = f"{header}.{claims}".encode()
    sig = b64(hmac.new(USER_SECRET, signing, hashlib.sha256).digest())
    return f"{header}.{claims}.{sig}"


def named_user(case) -> int:
    """The user the request acts for: the path's, else the body's, else 42."""
    for source in (case.path_parameters or {}, case.body if isinstance(case.body, dict) else {}):
        user = source.get("user_id")
        if isinstance(user, int) and not isinstance(user, bool) and 1 <= user <= MAX_ID:
            return user
    return 42


def body_bytes(case) -> bytes:
    """The bytes the requests transport sends for the case's body (it passes `json=`)."""
    body = case.body
    if isinstance(body, bytes):
        return body
    if body is None:
        return b"null"
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError):
        return b""


@schemathesis.auth(refresh_interval=None).apply_to(path_regex=r"^(/v1/admin/|/metrics$)")
class AdminToken:
    def get(self, case, ctx):
        return ADMIN

    def set(self, case, data, ctx):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


@schemathesis.auth(refresh_interval=None).apply_to(
    path_regex=r"^/v1/(users/|sales/[^/]+/items/[^/]+/(orders|orders/[^/]+|challenge|order-token)$)"
)
class UserToken:
    def get(self, case, ctx):
        return "user"

    def set(self, case, data, ctx):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {user_token(named_user(case))}"


@schemathesis.auth(refresh_interval=None).apply_to(path="/v1/payments")
class PaymentSignature:
    def get(self, case, ctx):
        return "signature"

    def set(self, case, data, ctx):
        t = str(int(time.time()))
        mac = hmac.new(PAYMENT_SECRET, t.encode() + b"." + body_bytes(case), hashlib.sha256)
        case.headers = case.headers or {}
        case.headers["Seckill-Signature"] = f"t={t},v1={mac.hexdigest()}"


ANSWERS = collections.Counter()


@schemathesis.hook
def after_call(ctx, case, response):
    ANSWERS[(case.operation.method.upper(), case.operation.path, response.status_code)] += 1


@atexit.register
def summary():
    if os.environ.get("CONTRACT_ALL"):
        for (method, path, status), n in sorted(ANSWERS.items()):
            print(f"  {n:5} x {status} {method} {path}")
    reached = {k: v for k, v in ANSWERS.items() if 200 <= k[2] < 300}
    print(f"contract: {sum(reached.values())} of {sum(ANSWERS.values())} requests answered 2xx:")
    for (method, path, status), n in sorted(reached.items()):
        print(f"  {n:5} x {status} {method} {path}")


TRANSIENT_CODES = {"unavailable", "overloaded", "shadow_unavailable"}


@schemathesis.check
def a_503_is_a_documented_refusal(ctx, response, case):
    """A 503 must be one of the documented transient refusals (problem+json with its code)."""
    if response.status_code != 503:
        return None
    try:
        code = json.loads(response.content).get("code")
    except (ValueError, AttributeError):
        code = None
    if code not in TRANSIENT_CODES:
        raise AssertionError(f"503 with code {code!r}, not one of {sorted(TRANSIENT_CODES)}")
    return None
