"""Operator commands: `safesteer keygen`, `sign`, `verify` (adapters) and `keys add` (API)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import AdapterError
from safesteer.adapters.signing import (
    Signature,
    TrustedKeys,
    generate_keypair,
    sign_file,
    signature_path,
)
from safesteer.server.auth import SCOPES, KeysFileError, add_key


def _keygen(args: argparse.Namespace) -> int:
    try:
        private, public = generate_keypair(args.out, args.signer)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"private key: {private} (keep it secret)\npublic key:  {public} (give to servers)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    try:
        SafetyAdapter.load(args.adapter)  # never sign something that is not a valid adapter
        path = sign_file(args.adapter, args.key, args.signer)
    except (AdapterError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    sig_file = signature_path(args.adapter)
    try:
        if not sig_file.is_file():
            raise AdapterError(f"{args.adapter.name} has no signature file {sig_file.name}")
        data = args.adapter.read_bytes()
        signer = TrustedKeys.from_dir(args.trusted_keys_dir).verify(
            data, Signature.from_json(sig_file.read_text())
        )
        adapter = SafetyAdapter.from_bytes(data, args.adapter.name)
    except (AdapterError, OSError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"OK: {adapter.id} signed by {signer!r}")
    return 0


def _keys_add(args: argparse.Namespace) -> int:
    try:
        key = add_key(args.keys_file, args.name, args.scope)
    except KeysFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"added key {args.name!r} with scopes {sorted(set(args.scope))} to {args.keys_file}")
    print("the key (shown once, store it now):", file=sys.stderr)
    print(key)
    return 0


def add_ops_commands(commands: Any) -> None:
    keygen = commands.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing adapters",
        description="Write <signer>.key (private, 0600) and <signer>.pub into --out.",
    )
    keygen.add_argument("--signer", required=True, help="signer name (file stem of the keys)")
    keygen.add_argument("--out", type=Path, default=Path("."), help="folder for the keys")
    keygen.set_defaults(func=_keygen)

    sign = commands.add_parser(
        "sign",
        help="sign an adapter file (writes <adapter>.sig)",
        description="Sign the whole adapter file with an Ed25519 private key.",
    )
    sign.add_argument("adapter", type=Path, help="adapter .safetensors file")
    sign.add_argument("--key", type=Path, required=True, help="private key (PEM) from keygen")
    sign.add_argument("--signer", help="signer name recorded (default: the key's file stem)")
    sign.set_defaults(func=_sign)

    verify = commands.add_parser(
        "verify",
        help="verify an adapter's signature against trusted public keys",
        description="Exit 0 when <adapter>.sig verifies with a key in --trusted-keys-dir "
        "and the adapter itself is valid; exit 1 otherwise.",
    )
    verify.add_argument("adapter", type=Path, help="adapter .safetensors file")
    verify.add_argument(
        "--trusted-keys-dir", type=Path, required=True, help="folder of <signer>.pub keys"
    )
    verify.set_defaults(func=_verify)

    keys = commands.add_parser(
        "keys",
        help="manage API keys",
        description="API keys are stored hashed in a TOML keys file.",
    )
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = keys_commands.add_parser(
        "add",
        help="create a key and append its hash to the keys file (prints the key once)",
    )
    add.add_argument("--keys-file", type=Path, required=True, help="keys file (TOML)")
    add.add_argument("--name", required=True, help="who the key belongs to (in audit logs)")
    add.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        required=True,
        help="scope of the key; repeat for several",
    )
    add.set_defaults(func=_keys_add)
