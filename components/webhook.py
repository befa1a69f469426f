"""MLflow webhooks for the alias watch: a small HTTP receiver that wakes ``lidgate watch`` the moment
the champion alias is set or removed, instead of at its next poll.

The MLflow server (3.x) POSTs ``{"entity", "action", "timestamp", "data"}`` with the headers
``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp`` (Unix seconds) and ``X-MLflow-Signature`` =
``v1,<base64 HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")>``. A delivery is accepted only
when the signature verifies with the shared secret, the timestamp is within ``MAX_AGE_S`` of now, and
its delivery id was not seen before (no replays). Accepted or not, a delivery never moves anything
itself: it only makes the watch look at the registry now (``components.gate.recover``), so a forged
call can at worst cause an extra look. The watch keeps polling as well, since deliveries can be lost.

The server only calls loopback or private addresses with ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true``
(``deployment/local_stack.sh`` sets it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ALIAS_EVENTS", "MAX_AGE_S", "WebhookError", "WebhookReceiver", "register_webhook", "sign_delivery",
           "verify_delivery"]

ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
MAX_AGE_S = 300.0
_MAX_BODY = 1 << 20


class WebhookError(ValueError):
    """A delivery that is refused; the message says why."""


def sign_delivery(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify_delivery(secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None,
                    max_age_s: float = MAX_AGE_S) -> dict[str, Any]:
    """The parsed payload of a delivery whose signature and timestamp check out.

    Raises:
        WebhookError: missing headers, a bad signature, a stale or future timestamp, or a body that is
            not a JSON object.
    """
    lower = {str(k).lower(): v for k, v in headers.items()}  # header names are case-insensitive
    delivery, stamp, signature = (lower.get(h) for h in
                                  ("x-mlflow-delivery-id", "x-mlflow-timestamp", "x-mlflow-signature"))
    if not delivery or not stamp or not signature:
        raise WebhookError("missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature")
    try:
        text = body.decode("utf-8")
        age = (time.time() if now is None else now) - int(stamp)
    except (UnicodeDecodeError, ValueError):
        raise WebhookError("the body is not UTF-8 or the timestamp is not an integer") from None
    if not hmac.compare_digest(sign_delivery(secret, delivery, stamp, text), signature):
        raise WebhookError("the signature does not verify with the shared secret")
    if abs(age) > max_age_s:
        raise WebhookError(f"the delivery is {age:.0f} s old (accepted: ±{max_age_s:.0f} s)")
    try:
        payload = json.loads(text)
    except ValueError:
        raise WebhookError("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise WebhookError("the body is not a JSON object")
    return payload


class WebhookReceiver:
    """An HTTP server on ``host:port`` in a background thread; :meth:`wait` returns True when a verified
    alias event for ``model_name`` arrived (or the timeout passed: False)."""

    def __init__(self, host: str, port: int, secret: str, model_name: str):
        self.secret, self.model_name = secret, model_name
        self.accepted = 0
        self.refused: list[str] = []
        self._wake = threading.Event()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 — http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                if length > _MAX_BODY:
                    self.send_error(413)
                    return
                status = receiver.deliver(dict(self.headers.items()), self.rfile.read(length))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet: the watch prints what matters
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="lidgate-webhook", daemon=True)
        self._thread.start()

    def deliver(self, headers: Mapping[str, str], body: bytes) -> int:
        """Handle one delivery; returns the HTTP status to answer with."""
        try:
            payload = verify_delivery(self.secret, headers, body)
        except WebhookError as exc:
            with self._lock:
                self.refused.append(str(exc))
            return 401
        delivery = next(str(v) for k, v in headers.items() if str(k).lower() == "x-mlflow-delivery-id")
        with self._lock:
            if delivery in self._seen:
                self.refused.append(f"delivery {delivery} replayed")
                return 409
            self._seen[delivery] = None
            while len(self._seen) > 10_000:
                self._seen.popitem(last=False)
            self.accepted += 1
        event = f"{payload.get('entity')}.{payload.get('action')}"
        data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        if event in ALIAS_EVENTS and data.get("name") == self.model_name:
            self._wake.set()
        return 200

    def wait(self, timeout: float) -> bool:
        woke = self._wake.wait(timeout)
        self._wake.clear()
        return woke

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def register_webhook(client, name: str, url: str, secret: str) -> str:
    """Create (or point at ``url`` with ``secret``) the MLflow webhook ``name`` for the alias events;
    returns its id."""
    existing = next((w for w in client.list_webhooks() if w.name == name), None)
    if existing is None:
        return client.create_webhook(name=name, url=url, events=list(ALIAS_EVENTS), secret=secret,
                                     description="lidgate watch: the champion alias changed").webhook_id
    client.update_webhook(existing.webhook_id, url=url, events=list(ALIAS_EVENTS), secret=secret, status="ACTIVE")
    return existing.webhook_id
