"""Signed certificates: an in-toto Statement in a DSSE envelope, signed with Ed25519.

The certify worker (or ``lidgate certify --sign-key``) holds the private key; the gate, the audit,
``lidgate verify --public-key`` and ``lidgate fetch`` hold the public keys they trust. A Statement binds, by digest, what the certificate speaks about:

* ``model``: ``lid_engine.fingerprint_model`` of the certified parameters and buffers (the registry
  pins the weights file, the rebuilt model and the MLflow model consumers load to the same value);
* ``lid/lid.json``: sha256 of the saved certificate (which itself pins every domain file);
* ``cert_data/<task>``: ``lid_engine.fingerprint_data`` of each task's certification data;

and its predicate says what was certified, per task: metric, comparator, τ, certified value,
passed, n, confidence, population lower bound, bound method, and the engine version.

Formats (public specifications, implemented here with ``cryptography``):

* DSSE v1: ``{"payloadType", "payload": base64(body), "signatures": [{"keyid", "sig"}]}``; the
  signature is over ``PAE(type, body) = "DSSEv1 <len(type)> <type> <len(body)> <body>"``.
* in-toto Statement v1: ``{"_type", "subject": [{"name", "digest": {"sha256"}}], "predicateType",
  "predicate"}``.

A key id is the sha256 of the public key's DER SubjectPublicKeyInfo. Private keys are PEM PKCS#8
files written with mode 0600; keep them on the certify worker only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PAYLOAD_TYPE", "PREDICATE_TYPE", "STATEMENT_TYPE", "SignatureError", "certificate_statement", "generate_keys",
    "KeyFileError", "SIGNATURE_FILE", "key_id", "load_private_key", "load_public_key", "load_public_keys", "sign", "sign_lid",
    "signed_mismatch", "verify_envelope",
]

SIGNATURE_FILE = "certificate.dsse.json"  # the envelope's file name next to a saved LID

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://lidgate.dev/certificate/v1"


class SignatureError(ValueError):
    """A signature, envelope or key that cannot be trusted; the message says which and why."""


class KeyFileError(SignatureError):
    """A key file that cannot be read or written (bad input, not a failed signature)."""


# ------------------------------------------------------------------------------------ keys
def generate_keys(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new Ed25519 key pair (private: PEM PKCS#8, mode 0600; public: PEM); returns its key id.

    Raises:
        SignatureError: either file exists already (keys are never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"'{path}' exists; lidgate never overwrites a key (move it away first)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return key_id(key.public_key())


def load_private_key(path: str | Path, field: str = "signing.private_key"):
    """The Ed25519 private key in a PEM file. Raises KeyFileError naming ``field`` and the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{field} '{path}': not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{field} '{path}': expected an Ed25519 key, got {type(key).__name__}")
    return key


def load_public_key(path: str | Path, field: str = "signing.public_keys"):
    """The Ed25519 public key in a PEM file. Raises KeyFileError naming ``field`` and the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{field} '{path}': not a readable PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{field} '{path}': expected an Ed25519 key, got {type(key).__name__}")
    return key


def load_public_keys(paths: Sequence[str | Path], field: str = "signing.public_keys") -> list:
    """Every Ed25519 public key in ``paths`` (the trusted keys); the first unreadable one raises
    KeyFileError naming ``field`` and the file."""
    return [load_public_key(p, field) for p in paths]


def key_id(public_key) -> str:
    """sha256 (hex) of the public key's DER SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


# ------------------------------------------------------------------------------------ statement
def certificate_statement(model, lid, lid_json_sha256: str, cert_data: Mapping[str, Any]) -> dict[str, Any]:
    """The in-toto Statement for a certified ``model`` and its ``lid`` (saved, ``lid.json`` hashing
    to ``lid_json_sha256``), certified on ``cert_data`` (task -> (x, y))."""
    from lid_engine import __version__ as engine_version
    from lid_engine import fingerprint_model
    from lid_engine.certificate import data_fingerprint

    subjects = [{"name": "model", "digest": {"sha256": fingerprint_model(model)}},
                {"name": "lid/lid.json", "digest": {"sha256": lid_json_sha256}}]
    subjects += [{"name": f"cert_data/{task}", "digest": {"sha256": data_fingerprint(cert_data[task])}}
                 for task in sorted(cert_data)]
    tasks = {}
    for task, spec in lid.tasks.items():
        first = lid.certificates[0][task]
        tasks[task] = {"metric": spec.kind, "comparator": ">=", "tau": spec.tau,
                       "certified": lid.certified_accuracy(task), "passed": lid.certified_accuracy(task) >= spec.tau,
                       "n": first.n, "confidence": lid.confidence, "population_lower_bound": lid.lower_bound(task),
                       "bound_method": first.bound_method, "members": len(lid)}
    predicate = {"engine_version": engine_version, "model_sha256": lid.model_sha256, "tasks": tasks}
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": PREDICATE_TYPE, "predicate": predicate}


def subject_digests(statement: Mapping[str, Any]) -> dict[str, str]:
    """``{name: sha256}`` of a statement's subjects."""
    return {s["name"]: s["digest"]["sha256"] for s in statement.get("subject", [])}


def sign_lid(lid_dir: str | Path, out: str | Path, private_key: str | Path, model, lid,
             cert_data: Mapping[str, tuple]) -> Path:
    """Sign the LID saved in ``lid_dir`` (its ``lid.json``) for ``model`` and ``cert_data`` with the key
    in the file ``private_key``; the envelope is written atomically to ``out``."""
    from lid_engine.files import atomic_write, file_sha256

    statement = certificate_statement(model, lid, file_sha256(Path(lid_dir) / "lid.json"), cert_data)
    envelope = sign(statement, load_private_key(private_key))
    return atomic_write(out, json.dumps(envelope, indent=2))


def signed_mismatch(signed: Mapping[str, str], expected: Mapping[str, str | None]) -> str | None:
    """Why a verified statement's subjects (``subject_digests``) do not speak about ``expected``
    (name -> sha256), or None when they name exactly those digests."""
    wrong = sorted(n for n in set(expected) | set(signed) if expected.get(n) != signed.get(n))
    if wrong:
        return (f"the signed statement does not match this certificate's {', '.join(wrong)} (a signature of "
                "another certificate, or artifacts changed after signing)")
    return None


# ------------------------------------------------------------------------------------ DSSE
def _pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def sign(statement: Mapping[str, Any], private_key) -> dict[str, Any]:
    """The DSSE envelope of ``statement`` signed with ``private_key`` (an Ed25519 key object)."""
    body = json.dumps(statement, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    signature = private_key.sign(_pae(PAYLOAD_TYPE, body))
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(body).decode("ascii"),
            "signatures": [{"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(signature).decode()}]}


def _strict_b64(value: Any, what: str) -> bytes:
    """Decode canonical base64 only (an edited padding or trailing bit is refused, not ignored)."""
    try:
        raw = base64.b64decode(value if isinstance(value, str) else "\x00", validate=True)
    except ValueError:
        raise SignatureError(f"the envelope's {what} is not base64") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise SignatureError(f"the envelope's {what} is not canonical base64")
    return raw


def verify_envelope(envelope: Any, public_keys: Sequence) -> dict[str, Any]:
    """The statement inside ``envelope`` if one of its signatures verifies with one of
    ``public_keys`` (Ed25519 key objects).

    Raises:
        SignatureError: malformed envelope, unknown key, bad signature, or not a lidgate certificate
            statement; the message says which.
    """
    from cryptography.exceptions import InvalidSignature

    if not isinstance(envelope, Mapping) or not isinstance(envelope.get("signatures"), list):
        raise SignatureError("the signature file is not a DSSE envelope (no 'signatures' list)")
    # strict: exactly the fields lidgate writes, canonical base64 — any edit of the file is refused
    if set(envelope) != {"payloadType", "payload", "signatures"} or not all(
            isinstance(e, Mapping) and set(e) == {"keyid", "sig"} for e in envelope["signatures"]):
        raise SignatureError("the envelope has fields other than payloadType, payload and signatures[{keyid, sig}]")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureError(f"payloadType is {envelope.get('payloadType')!r}, expected {PAYLOAD_TYPE!r}")
    body = _strict_b64(envelope.get("payload"), "payload")
    if not public_keys:
        raise SignatureError("no trusted public key is configured (signing.public_keys)")
    trusted = {key_id(k): k for k in public_keys}
    kids = [str(e["keyid"]) for e in envelope["signatures"]]
    unknown = [k[:12] for k in kids if k not in trusted]
    if not kids or unknown:  # every signature must be by a trusted key (co-signing during a rotation)
        raise SignatureError(f"signed by unknown key(s) {unknown or '(none)'}; trusted: {[k[:12] for k in trusted]}")
    for entry, kid in zip(envelope["signatures"], kids):
        try:
            trusted[kid].verify(_strict_b64(entry["sig"], "signature"), _pae(PAYLOAD_TYPE, body))
        except (InvalidSignature, ValueError):
            raise SignatureError(f"the signature by key {kid[:12]}… does not verify: the statement or the signature "
                                 "was changed after signing") from None
    try:
        statement = json.loads(body)
    except ValueError:
        raise SignatureError("the signed payload is not JSON") from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE \
            or statement.get("predicateType") != PREDICATE_TYPE:
        raise SignatureError("the signed payload is not a lidgate certificate statement")
    return statement
