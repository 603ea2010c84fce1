"""Ed25519 signatures for adapter files: `<adapter>.sig` next to the adapter.

The signature covers the whole file (tensors and metadata, so default weights and gates
too): the signed message is a domain tag followed by the file's sha256 digest. A signature
file is JSON: format, signer name, key id (first 16 hex digits of the sha256 of the raw
public key), the file's sha256 and the base64 signature. Trusted keys are PEM public keys,
one per `<signer>.pub` file in a folder.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from safesteer.adapters.errors import AdapterError

SIGNATURE_FORMAT = "safesteer-signature-v1"
SIGNATURE_SUFFIX = ".sig"
PUBLIC_KEY_SUFFIX = ".pub"
_DOMAIN = b"safesteer-adapter-signature-v1\x00"


class SignatureError(AdapterError):
    """An adapter is unsigned, signed by an unknown key, or its signature does not verify."""


@dataclass(frozen=True)
class Signature:
    """The contents of a `.sig` file."""

    signer: str
    key_id: str
    file_sha256: str
    signature: bytes

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": SIGNATURE_FORMAT,
                "signer": self.signer,
                "key_id": self.key_id,
                "file_sha256": self.file_sha256,
                "signature": base64.b64encode(self.signature).decode("ascii"),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Signature:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("format") != SIGNATURE_FORMAT:
                raise ValueError(f"not a {SIGNATURE_FORMAT} signature")
            return cls(
                signer=str(raw["signer"]),
                key_id=str(raw["key_id"]),
                file_sha256=str(raw["file_sha256"]),
                signature=base64.b64decode(str(raw["signature"]), validate=True),
            )
        except (ValueError, KeyError, binascii.Error) as exc:
            raise SignatureError(f"unreadable signature: {exc}") from exc


def signature_path(adapter_path: Path) -> Path:
    return adapter_path.with_name(adapter_path.name + SIGNATURE_SUFFIX)


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _message(file_sha256: str) -> bytes:
    return _DOMAIN + bytes.fromhex(file_sha256)


def generate_keypair(out_dir: Path, signer: str) -> tuple[Path, Path]:
    """Write `<signer>.key` (private, PEM, mode 0600) and `<signer>.pub`; refuse to overwrite."""
    if not signer or not all(ch.isalnum() or ch in "-_." for ch in signer):
        raise ValueError("signer names use letters, digits, '-', '_' and '.' only")
    private_path = out_dir / f"{signer}.key"
    public_path = out_dir / f"{signer}{PUBLIC_KEY_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting a key")
    out_dir.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.touch(mode=0o600)
    private_path.write_bytes(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path.name} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise SignatureError(f"{path.name} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path.name} is not an Ed25519 public key")
    return key


def sign_bytes(data: bytes, private_key: Ed25519PrivateKey, signer: str) -> Signature:
    digest = bytes_sha256(data)
    return Signature(
        signer=signer,
        key_id=key_id(private_key.public_key()),
        file_sha256=digest,
        signature=private_key.sign(_message(digest)),
    )


def sign_file(adapter_path: Path, private_key_path: Path, signer: str | None = None) -> Path:
    """Sign an adapter file; writes and returns `<adapter>.sig`."""
    signature = sign_bytes(
        adapter_path.read_bytes(),
        load_private_key(private_key_path),
        signer or private_key_path.stem,
    )
    path = signature_path(adapter_path)
    path.write_text(signature.to_json() + "\n")
    return path


@dataclass(frozen=True)
class TrustedKeys:
    """Public keys whose signatures the server accepts, by key id."""

    keys: dict[str, tuple[str, Ed25519PublicKey]]

    @classmethod
    def from_dir(cls, folder: Path) -> TrustedKeys:
        if not folder.is_dir():
            raise SignatureError(f"trusted keys folder {folder} does not exist")
        keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
        for path in sorted(folder.glob(f"*{PUBLIC_KEY_SUFFIX}")):
            public = load_public_key(path)
            keys[key_id(public)] = (path.stem, public)
        return cls(keys)

    @classmethod
    def empty(cls) -> TrustedKeys:
        return cls({})

    def verify(self, data: bytes, signature: Signature) -> str:
        """The trusted signer's name.

        Raises:
            SignatureError: wrong file hash, unknown key, or a signature that does not verify.
        """
        digest = bytes_sha256(data)
        if signature.file_sha256 != digest:
            raise SignatureError(
                "the signature is for another file (sha256 "
                f"{signature.file_sha256[:16]}..., this file {digest[:16]}...)"
            )
        entry = self.keys.get(signature.key_id)
        if entry is None:
            raise SignatureError(
                f"signed by key {signature.key_id} ({signature.signer!r}), which is not trusted"
            )
        name, public = entry
        try:
            public.verify(signature.signature, _message(digest))
        except InvalidSignature:
            raise SignatureError(
                "the signature does not verify: file or signature altered"
            ) from None
        return name
