"""Hop authentication: every message between the stages proves which service sent it.

The broker's password says only "one of the services" (today one shared user), so anyone who
holds it could publish a batch to `pipeline/sign` and have it signed into the ledger, or a
stage receipt that makes an upstream delete its outbox rows. Every pipeline message is
therefore sealed by the sending service's own Ed25519 hop key and opened by the receiver,
which accepts it only from the one service entitled to send on that topic:

=================================  ==================  ======================================
topic (under mro/<station>/)       sealed by           body
=================================  ==================  ======================================
pipeline/validate                  ingest              Envelope of ReceivedRecord | FateQuery
pipeline/sign                      validate            Envelope of ValidatedRecord | FateQuery
pipeline/uplink                    sign                Envelope of SignedRow | FateQuery
pipeline/receipt/<stage>           the stage after it  StageReceipt
pipeline/outcome                   validate, sign      Outcomes (`recorded` only from sign)
pipeline/retention                 uplink              GatewayHolds (retained: how far to prune)
=================================  ==================  ======================================

Wire form (`Sealed`, `"type": "sealed/1"`): `{type, source, body, sig}` where `body` is the hop
message exactly as before and `sig` the hex Ed25519 signature of `hop_digest`, SHA-256 over
`"mro-edge hop/1\\n" || len+topic || len+source || body`: it binds the topic (a batch cannot
be replayed onto another hop), the sender and the exact body bytes. A replay onto
the same hop is harmless (every item is deduplicated by its idempotency key).

Why Ed25519 and not an HMAC: with one secret per hop both ends hold it, so a compromised
sign could forge validate's batches to itself; with per-service key pairs a service holds
only its own private key and the verifiers only public keys, so a compromised downstream can
never forge upstream traffic. pynacl was already a dependency (the ledger's keys).

Keys (`HopKeys`, made by `ensure_hop_keys` from `mro-edge run`, `mro-edge devices init` (the
compose `init`) and `mro-edge keys hop-init`): each service's private key in its own 0700
directory `$MRO_DATA_DIR/hopkeys/<service>/hop.key` (0600, PKCS#8 PEM), the public keys in
`hopkeys/public/<service>.pub.pem`. A stage whose own key or a sender's public key is missing
refuses to start (`HopKeyError`): traffic is never accepted unauthenticated.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nacl.exceptions
import nacl.signing

from shared.ledger.keys import KeyFileError, KeyFormatError, SigningKey, public_key_from_pem, public_key_to_pem
from shared.runtime.files import write_atomic
from shared.runtime.messages import Outcomes, outcomes_decoder
from shared.runtime.topics import Topics

CHAIN: tuple[str, ...] = ("ingest", "validate", "sign", "uplink")
LEDGER_STAGE = "sign"  # the only stage that may tell ingest a record is `recorded`
OUTCOME_SENDERS: tuple[str, ...] = ("validate", "sign")
HOP_DOMAIN = b"mro-edge hop/1\n"
HOPKEYS_DIR = "hopkeys"
HOP_AUTH_RULE = "hop_auth"
_SIGNATURE_HEX = 128


class Sealed(msgspec.Struct, frozen=True, tag="sealed/1"):
    """A pipeline message with its sender and the sender's hop signature (see the module doc)."""

    source: str
    body: msgspec.Raw
    sig: str


_sealed_decoder = msgspec.json.Decoder(Sealed)
_encode = msgspec.json.Encoder().encode


class HopKeyError(Exception):
    """A hop key is missing or unreadable; the message says which and what to run."""


class HopAuthError(Exception):
    """A message that is not sealed by a service entitled to send it on its topic."""

    def __init__(self, received: str) -> None:
        super().__init__(received)
        self.received = received


def hop_digest(topic: str, source: str, body: bytes) -> bytes:
    """What the hop signature signs: SHA-256 of the domain, topic and source (length-prefixed)
    and the body bytes. Signing the 32-byte digest rather than the body itself hashes a 250-record
    batch once instead of twice with SHA-512 inside Ed25519 (bench/hopauth.py)."""
    t, s = topic.encode(), source.encode()
    digest = hashlib.sha256(HOP_DOMAIN)
    digest.update(struct.pack(">H", len(t)) + t + struct.pack(">H", len(s)) + s)
    digest.update(body)
    return digest.digest()


def entitled_senders(topics: Topics) -> dict[str, tuple[str, ...]]:
    """Every sealed topic of the station and the services entitled to send on it."""
    senders: dict[str, tuple[str, ...]] = {topics.outcomes: OUTCOME_SENDERS, topics.gateway_holds: ("uplink",)}
    for before, after in zip(CHAIN, CHAIN[1:], strict=False):
        senders[topics.stage_input(after)] = (before,)
        senders[topics.stage_receipt(before)] = (after,)
    return senders


# -- keys ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HopKeys:
    """The hop key files under `$MRO_DATA_DIR/hopkeys/` (layout in the module doc)."""

    dir: Path

    @classmethod
    def of(cls, data_path: Path) -> HopKeys:
        return cls(Path(data_path) / HOPKEYS_DIR)

    def private_path(self, service: str) -> Path:
        return self.dir / service / "hop.key"

    def public_path(self, service: str) -> Path:
        return self.dir / "public" / f"{service}.pub.pem"

    def signing_key(self, service: str) -> SigningKey:
        path = self.private_path(service)
        if not path.exists():
            raise HopKeyError(f"no hop key for {service} at {path}: run 'mro-edge keys hop-init' (or "
                              "'mro-edge devices init', compose's init) once before starting the services")
        try:
            return SigningKey.load(path)
        except KeyFileError as exc:
            raise HopKeyError(f"the {service} hop key is unusable: {exc}") from None

    def public_key(self, service: str) -> nacl.signing.VerifyKey:
        path = self.public_path(service)
        try:
            return nacl.signing.VerifyKey(public_key_from_pem(path.read_text("ascii")))
        except FileNotFoundError:
            raise HopKeyError(f"no public hop key of {service} at {path}, so nothing {service} sends can be "
                              "authenticated: run 'mro-edge keys hop-init' (or 'mro-edge devices init', "
                              "compose's init) before starting the services") from None
        except (OSError, UnicodeDecodeError, KeyFormatError) as exc:
            raise HopKeyError(f"the public hop key {path} is unreadable ({exc}): run "
                              "'mro-edge keys hop-init' to write it again from the service's key") from None


def ensure_hop_keys(data_path: Path, services: tuple[str, ...] = CHAIN) -> list[str]:
    """Create each service's hop key (if absent) and (re)write its public key; returns the services
    whose key was made now. Idempotent: an existing private key is never replaced."""
    keys = HopKeys.of(data_path)
    made = []
    public_dir = keys.dir / "public"
    try:
        SigningKey.ensure_private_dir(keys.dir)
        public_dir.mkdir(mode=0o755, exist_ok=True)
        for service in services:
            existed = keys.private_path(service).exists()
            key = SigningKey.load_or_create(keys.private_path(service).parent, "hop")
            pem = public_key_to_pem(key.public_bytes).encode("ascii")
            path = keys.public_path(service)
            if not path.exists() or path.read_bytes() != pem:
                write_atomic(path, pem, mode=0o644)
            if not existed:
                made.append(service)
        os.chmod(keys.dir, 0o711)  # verifiers traverse to public/; each service dir stays 0700
    except (KeyFileError, OSError) as exc:
        raise HopKeyError(f"cannot provision the hop keys in {keys.dir}: {exc}") from None
    return made


# -- sealing and opening ------------------------------------------------------------------------

class HopAuth:
    """One service's side of hop authentication: seal what it sends on sealed topics, open (verify)
    what it receives on them. Built with only the public keys of the senders it listens to."""

    def __init__(self, topics: Topics, service: str, key: SigningKey | None,
                 verifiers: dict[str, nacl.signing.VerifyKey]) -> None:
        self.service = service
        self._key = key
        self._senders = entitled_senders(topics)
        self._verifiers = verifiers
        self._outcomes = topics.outcomes

    @classmethod
    def for_service(cls, data_path: Path, topics: Topics, service: str, listens: tuple[str, ...]) -> HopAuth:
        """The service's own key and the public keys of every sender entitled on the `listens` topics
        (HopKeyError if any is missing: refuse to start rather than accept unauthenticated traffic)."""
        keys = HopKeys.of(data_path)
        senders = entitled_senders(topics)
        needed = sorted({s for topic in listens for s in senders.get(topic, ())})
        own = keys.signing_key(service) if service in CHAIN else None
        return cls(topics, service, own, {name: keys.public_key(name) for name in needed})

    def sealed(self, topic: str) -> bool:
        """Whether messages on `topic` must carry a hop seal."""
        return topic in self._senders

    def seal(self, topic: str, body: bytes) -> bytes:
        """`body` sealed for `topic` if it is a sealed topic, else `body` unchanged."""
        if topic not in self._senders:
            return body
        if self._key is None or self.service not in self._senders[topic]:
            raise HopKeyError(f"{self.service} is not entitled to send on {topic}")
        sig = self._key.sign_raw(hop_digest(topic, self.service, body))
        return _encode(Sealed(self.service, msgspec.Raw(body), sig.hex()))

    def open(self, topic: str, payload: bytes) -> tuple[str, bytes]:
        """(sender, body) of a sealed message; HopAuthError says what is wrong with it otherwise."""
        try:
            sealed = _sealed_decoder.decode(payload)
        except msgspec.DecodeError:
            raise HopAuthError("no hop seal (a {type: sealed/1, source, body, sig} message)") from None
        source = sealed.source
        if source not in self._senders.get(topic, ()):
            raise HopAuthError(f"sealed by {source[:32]!r}, which may not send on this topic")
        verifier = self._verifiers.get(source)
        if verifier is None:
            raise HopAuthError(f"sealed by {source[:32]!r}, whose public key this service does not hold")
        body = bytes(sealed.body)
        try:
            if len(sealed.sig) != _SIGNATURE_HEX:
                raise ValueError
            verifier.verify(hop_digest(topic, source, body), bytes.fromhex(sealed.sig))
        except (ValueError, nacl.exceptions.BadSignatureError):
            raise HopAuthError(f"the seal of {source!r} does not verify (forged, altered or another "
                               "hop's)") from None
        if topic == self._outcomes:
            self._check_outcomes(source, body)
        return source, body

    @staticmethod
    def _check_outcomes(source: str, body: bytes) -> None:
        """Only the ledger's stage may say `recorded`; validate tells rejections only."""
        if source == LEDGER_STAGE:
            return
        try:
            told: Outcomes = outcomes_decoder.decode(body)
        except msgspec.DecodeError:
            return  # unreadable: the notice handler reports it like any unreadable notice
        if any(outcome.status == "recorded" for outcome in told.outcomes):
            raise HopAuthError(f"a `recorded` outcome from {source!r}: only {LEDGER_STAGE} records")


def hop_auth_report(stage: str, topic: str, received: str, at: str) -> dict:
    """The DLQ report of a message whose seal failed (error report format, rule `hop_auth`)."""
    error = {"path": "$", "rule": HOP_AUTH_RULE,
             "expected": f"a message on {topic} sealed by the service entitled to send it",
             "received": received[:160]}
    return {"stage": stage, "received_at": at, "errors": [error]}
