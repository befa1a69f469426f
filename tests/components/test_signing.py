"""components.signing: DSSE envelopes over in-toto statements, Ed25519 keys. A changed byte anywhere
in what was signed, an unknown key or a malformed envelope is refused with a reason."""

from __future__ import annotations

import base64
import json
import stat

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.signing import (
    PREDICATE_TYPE,
    SignatureError,
    certificate_statement,
    generate_keys,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    subject_digests,
    verify_envelope,
)
from lid_engine import LID, Box, Spec, fingerprint_data, fingerprint_model
from tests.helpers.models import mlp


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate_keys(d / "a.key", d / "a.pub")
    generate_keys(d / "b.key", d / "b.pub")
    return {n: (load_private_key(d / f"{n}.key"), load_public_key(d / f"{n}.pub")) for n in "ab"}


@pytest.fixture(scope="module")
def certified():
    torch.manual_seed(0)
    model = mlp([4, 8, 3]).eval()
    x = torch.randn(64, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    lid = LID.certify(model, [Box.around(model, 1e-4)], {"t": (x, y)}, {"t": Spec("accuracy", 0.5)})
    return model, lid, {"t": (x, y)}


def statement(certified) -> dict:
    model, lid, data = certified
    return certificate_statement(model, lid, "ab" * 32, data)


def test_the_statement_names_model_certificate_and_data_and_says_what_was_certified(certified):
    model, lid, data = certified
    s = statement(certified)
    assert s["predicateType"] == PREDICATE_TYPE
    assert subject_digests(s) == {"model": fingerprint_model(model), "lid/lid.json": "ab" * 32,
                                  "cert_data/t": fingerprint_data(*data["t"])}
    task = s["predicate"]["tasks"]["t"]
    assert task["tau"] == 0.5 and task["certified"] == lid.certified_accuracy("t") and task["n"] == 64
    assert task["passed"] is True and task["bound_method"] and 0 < task["confidence"] < 1


def test_round_trip_and_key_ids(keys, certified):
    private, public = keys["a"]
    envelope = sign(statement(certified), private)
    assert envelope["signatures"][0]["keyid"] == key_id(public)
    assert verify_envelope(envelope, [keys["b"][1], public]) == statement(certified)
    with pytest.raises(SignatureError, match="unknown key"):
        verify_envelope(envelope, [keys["b"][1]])
    with pytest.raises(SignatureError, match="no trusted public key"):
        verify_envelope(envelope, [])


@settings(max_examples=60, deadline=None)
@given(where=st.sampled_from(["payload", "sig"]), position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_in_the_payload_or_signature_is_refused(keys, certified, where, position, bit):
    private, public = keys["a"]
    envelope = sign(statement(certified), private)
    raw = bytearray(base64.b64decode(envelope["payload"] if where == "payload" else envelope["signatures"][0]["sig"]))
    raw[position % len(raw)] ^= 1 << bit
    encoded = base64.b64encode(bytes(raw)).decode()
    if where == "payload":
        envelope = {**envelope, "payload": encoded}
    else:
        envelope = {**envelope, "signatures": [{**envelope["signatures"][0], "sig": encoded}]}
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(envelope, [public])


@pytest.mark.parametrize("mutate,fragment", [
    (lambda e: [], "not a DSSE envelope"),
    (lambda e: {**e, "signatures": "x"}, "not a DSSE envelope"),
    (lambda e: {**e, "payloadType": "text/plain"}, "payloadType"),
    (lambda e: {**e, "payload": "%%%"}, "not base64"),
    (lambda e: {**e, "signatures": []}, "unknown key"),
    # strict: a field added anywhere, a non-canonical base64 padding bit, or a second signature by an
    # untrusted key is an edit of the file, refused even though the trusted signature still verifies
    (lambda e: {**e, "note": "x"}, "fields other than"),
    (lambda e: {**e, "signatures": [{**e["signatures"][0], "sig_x": True}]}, "fields other than"),
    (lambda e: {**e, "signatures": [{**e["signatures"][0], "sig": e["signatures"][0]["sig"][:-3] + "B=="}]},
     "not canonical|does not verify"),
    (lambda e: {**e, "signatures": e["signatures"] + [{"keyid": "0" * 64, "sig": e["signatures"][0]["sig"]}]},
     "unknown key"),
])
def test_malformed_envelopes_are_refused_with_a_reason(keys, certified, mutate, fragment):
    envelope = sign(statement(certified), keys["a"][0])
    with pytest.raises(SignatureError, match=fragment):
        verify_envelope(mutate(envelope), [keys["a"][1]])


def test_a_signed_payload_that_is_not_a_certificate_statement_is_refused(keys):
    envelope = sign({"_type": "https://in-toto.io/Statement/v1", "predicateType": "other"}, keys["a"][0])
    with pytest.raises(SignatureError, match="not a lidgate certificate"):
        verify_envelope(envelope, [keys["a"][1]])


def test_keys_are_private_and_never_overwritten(tmp_path):
    kid = generate_keys(tmp_path / "k", tmp_path / "k.pub")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600 and len(kid) == 64
    with pytest.raises(SignatureError, match="never overwrites"):
        generate_keys(tmp_path / "k", tmp_path / "other.pub")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(SignatureError, match="junk.pem"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(SignatureError, match="junk.pem"):
        load_private_key(tmp_path / "junk.pem")
    assert key_id(load_public_key(tmp_path / "k.pub")) == kid
