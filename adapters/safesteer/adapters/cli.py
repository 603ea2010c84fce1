"""Toolkit subcommands of the `safesteer` command: `inspect`, `extract`.

The server package adds `serve` on top (dependency direction: server -> adapters).
Each subcommand sets `func(args) -> int` (the exit status).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import AdapterError


def _inspect(args: argparse.Namespace) -> int:
    try:
        adapter = SafetyAdapter.load(args.file)
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header = adapter.to_header()
    if args.json:
        header["norms"] = adapter.norms()
        print(json.dumps(header, indent=2))
        return 0
    print(f"adapter      {adapter.id}")
    for key in ("family", "architecture", "hidden_size", "num_layers", "layer_convention"):
        print(f"{key:<12} {header[key]}")
    print(f"sha256       {adapter.payload_sha256}")
    print(f"fingerprint  {header['base_fingerprint'] or '-'}")
    print(f"layers       {', '.join(map(str, adapter.layers))}")
    print("categories   (default weight, norm of coefficient*vector per layer)")
    norms = adapter.norms()
    for name, spec in adapter.metadata.categories.items():
        per_layer = " ".join(f"L{la}={n:.2f}" for la, n in sorted(norms.get(name, {}).items()))
        print(f"  {name:<15} w={spec.default_weight:<4g} {per_layer}")
        print(f"  {'':<15} {spec.description}")
    if adapter.conditions:
        print(f"conditions   {', '.join(sorted(adapter.conditions))}")
    recipe: dict[str, Any] = dict(adapter.metadata.recipe)
    if recipe:
        print("recipe       " + json.dumps(recipe, sort_keys=True)[:2000])
    return 0


def add_toolkit_commands(commands: Any) -> None:
    """Register the toolkit's subcommands on an argparse subparsers object."""
    inspect = commands.add_parser(
        "inspect", help="print an adapter's metadata and per-category norms",
        description="Print an adapter file's metadata, layers and per-category vector norms.",
    )
    inspect.add_argument("file", help="adapter .safetensors file")
    inspect.add_argument("--json", action="store_true", help="print the full header as JSON")
    inspect.set_defaults(func=_inspect)
