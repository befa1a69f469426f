"""The webhook receiver of `lidgate watch --listen`: only signed, fresh, first-time deliveries of an
alias event for the watched model wake the watch (the stack test drives it from a real MLflow server)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.webhook import WebhookError, WebhookReceiver, sign_delivery, verify_delivery

SECRET = "a-shared-secret-of-some-length"


def delivery(body: dict, *, secret: str = SECRET, delivery_id: str = "d-1", at: float | None = None):
    text = json.dumps(body)
    stamp = str(int(time.time() if at is None else at))
    return {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": sign_delivery(secret, delivery_id, stamp, text)}, text.encode()


ALIAS = {"entity": "model_version_alias", "action": "created", "data": {"name": "m", "alias": "champion",
                                                                      "version": "3"}}


def test_a_signed_fresh_delivery_is_accepted():
    headers, body = delivery(ALIAS)
    assert verify_delivery(SECRET, headers, body)["data"]["version"] == "3"


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_any_changed_byte_of_the_body_is_refused(position, byte):
    headers, body = delivery(ALIAS)
    raw = bytearray(body)
    i = position % len(raw)
    if raw[i] == byte:
        return
    raw[i] = byte
    with pytest.raises(WebhookError):
        verify_delivery(SECRET, headers, bytes(raw))


@pytest.mark.parametrize("case,fragment", [
    ("other secret", "does not verify"),
    ("stale", "old"),
    ("future", "old"),
    ("no signature", "missing"),
])
def test_bad_deliveries_are_refused_with_a_reason(case, fragment):
    headers, body = delivery(ALIAS, secret="another-secret-entirely" if case == "other secret" else SECRET,
                             at=time.time() + {"stale": -3600, "future": 3600}.get(case, 0))
    if case == "no signature":
        del headers["X-MLflow-Signature"]
    with pytest.raises(WebhookError, match=fragment):
        verify_delivery(SECRET, headers, body)


def test_the_receiver_wakes_only_for_its_model_and_refuses_replays():
    receiver = WebhookReceiver("127.0.0.1", 0, SECRET, "m")
    try:
        def post(headers, body) -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{receiver.port}/", data=body, headers=headers,
                                             method="POST")
            try:
                return urllib.request.urlopen(request, timeout=10).status
            except urllib.error.HTTPError as exc:
                return exc.code

        other = {**ALIAS, "data": {**ALIAS["data"], "name": "another-model"}}
        assert post(*delivery(other, delivery_id="d-0")) == 200 and not receiver.wait(0.2)
        headers, body = delivery(ALIAS)
        assert post(headers, body) == 200 and receiver.wait(5)
        assert post(headers, body) == 409 and not receiver.wait(0.2)  # the same delivery again: a replay
        forged = dict(headers, **{"X-MLflow-Delivery-Id": "d-2"})  # signature no longer matches
        assert post(forged, body) == 401 and not receiver.wait(0.2)
        assert receiver.accepted == 2 and len(receiver.refused) == 2
    finally:
        receiver.close()
