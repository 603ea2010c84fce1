"""The adapters of one model family: verified on load, several held, one active.

Swapping is one reference assignment under a lock. A request reads the active record once,
at admission, and builds its steering from that record's basis; later swaps never reach it.
Every record's basis spans the same layers (all decoder layers of the family), so rows steered
by different adapters share one set of hooks and one batch table.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import AdapterError
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.gating import PromptGate
from safesteer.adapters.merging import MergingBasis, merge_scheme
from safesteer.adapters.signing import (
    Signature,
    SignatureError,
    TrustedKeys,
    bytes_sha256,
    signature_path,
)
from safesteer.adapters.table import SteeringBasis


class AdapterNotLoaded(KeyError):
    """No adapter with this id is loaded for the family."""


class AdapterInUse(Exception):
    """The adapter is active (or pinned to a served model) and cannot be unloaded."""


@dataclass(frozen=True, eq=False)
class AdapterRecord:
    """A verified adapter, where it came from, and its packed basis. Immutable."""

    adapter: SafetyAdapter
    basis: SteeringBasis
    gate: PromptGate | None  # the adapter's condition probes, when it has them
    origin: str  # path relative to the adapter folder, or "upload:<file name>"
    file_sha256: str
    signer: str | None

    @property
    def id(self) -> str:
        return self.adapter.id


class AdapterVerifier:
    """Opens adapter bytes: signature check (when trusted keys are set), then format check."""

    def __init__(self, trusted: TrustedKeys, *, require_signed: bool) -> None:
        self.trusted = trusted
        self.require_signed = require_signed

    def open(
        self, data: bytes, display: str, signature: Signature | None
    ) -> tuple[SafetyAdapter, str | None]:
        """The adapter and its trusted signer (None: unsigned and not required).

        Without trusted keys (and signatures not required) a signature is not checked.

        Raises:
            SignatureError: signature required but missing, or present but not valid.
            AdapterError: not a valid adapter file.
        """
        signer: str | None = None
        if signature is not None and (self.trusted.keys or self.require_signed):
            signer = self.trusted.verify(data, signature)
        elif self.require_signed:
            raise SignatureError(f"{display} is not signed and this server requires signatures")
        return SafetyAdapter.from_bytes(data, display), signer

    def open_file(self, path: Path, display: str) -> tuple[SafetyAdapter, str | None, bytes]:
        """Read `path` and its `.sig` (if any) once; verify what was read."""
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise AdapterError(f"adapter file {display} does not exist") from exc
        except OSError as exc:
            raise AdapterError(f"adapter file {display} cannot be read") from exc
        sig_file = signature_path(path)
        signature = Signature.from_json(sig_file.read_text()) if sig_file.is_file() else None
        adapter, signer = self.open(data, display, signature)
        return adapter, signer, data


class FamilyAdapters:
    """One family's loaded adapters and the active one."""

    def __init__(
        self,
        family: ModelFamily,
        *,
        device: torch.device | str = "cpu",
        mandatory: dict[str, float] | None = None,
        merge: str | None = None,
    ) -> None:
        self.family = family
        self.device = device
        # None: each adapter combines its categories under the scheme it was calibrated for.
        self.merge = merge
        self.layers = tuple(range(family.num_layers))
        self.mandatory = dict(mandatory or {})
        self._records: dict[str, AdapterRecord] = {}
        self._active: AdapterRecord | None = None
        self._pinned: set[str] = set()
        # The adapter the config (or flags) made active at startup; set once by startup.
        self.configured_id: str | None = None
        self._lock = threading.Lock()

    # ----- reads (lock-free: each is one reference read) ------------------------------------
    @property
    def active(self) -> AdapterRecord | None:
        return self._active

    @property
    def records(self) -> list[AdapterRecord]:
        return list(self._records.values())

    def get(self, adapter_id: str) -> AdapterRecord:
        try:
            return self._records[adapter_id]
        except KeyError:
            raise AdapterNotLoaded(adapter_id) from None

    # ----- writes ---------------------------------------------------------------------------
    def add(
        self, adapter: SafetyAdapter, *, origin: str, file_sha256: str, signer: str | None
    ) -> AdapterRecord:
        """Hold a verified adapter (the same payload again returns the held record).

        Raises:
            AdapterMismatch: the adapter was made for another family.
            AdapterError: a mandatory category of the family is missing from it.
        """
        adapter.check_fits(self.family)
        missing = sorted(set(self.mandatory) - set(adapter.categories))
        if missing:
            raise AdapterError(
                f"adapter {adapter.id} lacks the family's mandatory categories {missing}"
            )
        with self._lock:
            held = self._records.get(adapter.id)
            if held is not None:
                return held
            basis = MergingBasis.of(
                SteeringBasis.from_adapter(adapter, device=self.device, layers=self.layers),
                merge_scheme(self.merge, adapter),
            )
            gate = (
                PromptGate.from_adapter(adapter, device=self.device)
                if adapter.metadata.gate is not None
                else None
            )
            record = AdapterRecord(adapter, basis, gate, origin, file_sha256, signer)
            self._records[record.id] = record
            return record

    def add_bytes(
        self, data: bytes, adapter: SafetyAdapter, *, origin: str, signer: str | None
    ) -> AdapterRecord:
        return self.add(adapter, origin=origin, file_sha256=bytes_sha256(data), signer=signer)

    def activate(self, adapter_id: str) -> tuple[AdapterRecord | None, AdapterRecord]:
        """Make a held adapter the active one; returns (previous, new)."""
        with self._lock:
            record = self.get(adapter_id)
            previous, self._active = self._active, record
            return previous, record

    def pin(self, adapter_id: str) -> AdapterRecord:
        """Mark a held adapter as pinned to a served model (it can never be unloaded)."""
        with self._lock:
            record = self.get(adapter_id)
            self._pinned.add(adapter_id)
            return record

    def unload(self, adapter_id: str) -> AdapterRecord:
        with self._lock:
            record = self.get(adapter_id)
            if self._active is record:
                raise AdapterInUse(f"{adapter_id} is the active adapter of {self.family.id}")
            if adapter_id in self._pinned:
                raise AdapterInUse(f"{adapter_id} is pinned to a served model")
            del self._records[adapter_id]
            return record
