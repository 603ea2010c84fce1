"""Adapter administration: load (from the adapter folder or by upload), activate, unload.

Every action, allowed or refused, is appended to the audit log. A refused load or activation
leaves the family exactly as it was. Activations are written to the state file, so the active
adapter of each family survives a restart.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import AdapterError
from safesteer.adapters.signing import Signature, bytes_sha256, signature_path
from safesteer.server.adapter_store import (
    AdapterInUse,
    AdapterNotLoaded,
    AdapterRecord,
    AdapterVerifier,
    FamilyAdapters,
)
from safesteer.server.errors import APIError, Conflict, InvalidRequest, NotFound, PayloadTooLarge
from safesteer.server.registry import ModelRegistry
from safesteer.server.state import UPLOADS_DIR, ActiveEntry, ActiveState, AuditLog

log = logging.getLogger(__name__)
UPLOAD_PREFIX = "upload:"
ADAPTER_SUFFIX = ".safetensors"
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterRefused(InvalidRequest):
    default_code = "adapter_refused"


def resolve_in_dir(folder: Path, relative: str) -> Path:
    """`folder/relative`, refusing anything that is not a `.safetensors` file inside `folder`.

    Raises:
        InvalidRequest: absolute paths, `..` escapes, symlinks out, other suffixes.
        NotFound: no such file in the folder.
    """
    if not relative or Path(relative).is_absolute() or "\x00" in relative:
        raise InvalidRequest("path must be relative to the adapter folder", param="path")
    if not relative.endswith(ADAPTER_SUFFIX):
        raise InvalidRequest(f"path must name a {ADAPTER_SUFFIX} file", param="path")
    root = folder.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise InvalidRequest("path escapes the adapter folder", param="path")
    if not target.is_file():
        raise NotFound("no such adapter file in the adapter folder", param="path")
    return target


@dataclass(frozen=True)
class AdapterSummary:
    """What the admin API shows about a held adapter."""

    id: str
    name: str
    family: str
    sha256: str
    payload_sha256: str
    categories: list[str]
    layers: list[int]
    signer: str | None
    origin: str
    active: bool


def summary(record: AdapterRecord, active: AdapterRecord | None) -> AdapterSummary:
    adapter = record.adapter
    return AdapterSummary(
        id=record.id,
        name=adapter.metadata.name,
        family=adapter.metadata.family,
        sha256=record.file_sha256,
        payload_sha256=adapter.payload_sha256,
        categories=adapter.categories,
        layers=adapter.layers,
        signer=record.signer,
        origin=record.origin,
        active=record is active,
    )


SwapListener = Callable[[FamilyAdapters, AdapterRecord], None]


class AdapterAdmin:
    """The one place adapters enter, change state or leave a running server."""

    def __init__(
        self,
        registry: ModelRegistry,
        verifier: AdapterVerifier,
        adapter_dir: Path,
        state_dir: Path,
        *,
        max_upload_bytes: int,
    ) -> None:
        self.registry = registry
        self.verifier = verifier
        self.adapter_dir = adapter_dir
        self.uploads_dir = state_dir / UPLOADS_DIR
        self.active_state = ActiveState(state_dir)
        self.audit = AuditLog(state_dir)
        self.max_upload_bytes = max_upload_bytes
        self.swap_listeners: list[SwapListener] = []

    # ----- opening files (also used at startup) ---------------------------------------------
    def path_of(self, origin: str) -> Path:
        """The file an origin names: `upload:<file>` in the uploads folder, else adapter dir."""
        if origin.startswith(UPLOAD_PREFIX):
            return resolve_in_dir(self.uploads_dir, origin.removeprefix(UPLOAD_PREFIX))
        return resolve_in_dir(self.adapter_dir, origin)

    def hold(self, path: Path, origin: str) -> AdapterRecord:
        """Verify `path` and hold it in its family's store.

        Raises:
            AdapterError: bad file, bad signature, wrong family, or a family not served.
        """
        adapter, signer, data = self.verifier.open_file(path, path.name)
        family = self._family_of(adapter)
        return family.add_bytes(data, adapter, origin=origin, signer=signer)

    def _family_of(self, adapter: SafetyAdapter) -> FamilyAdapters:
        for family in self.registry.families:
            if family.family.id == adapter.metadata.family:
                return family
        families = self.registry.families
        if len(families) == 1:
            adapter.check_fits(families[0].family)  # raises, naming the mismatched field
        served = ", ".join(f.family.id for f in families)
        raise AdapterError(
            f"adapter {adapter.id} is for family {adapter.metadata.family}; "
            f"this server serves {served}"
        )

    # ----- the state file -------------------------------------------------------------------
    def restore_active(self, actor: str | None = None) -> list[AdapterSummary]:
        """Activate what the state file records per family, where it still verifies.

        At startup (no actor) and on `POST /admin/reload-state` (audited), so replicas that
        share a state folder pick up an activation made on another one. A family is skipped
        when its configured default changed since the activation, or the file no longer
        matches the recorded sha256.
        """
        restored: list[AdapterSummary] = []
        saved = self.active_state.read()
        for family in self.registry.families:
            entry = saved.get(family.family.id)
            if entry is None or (family.active and family.active.id == entry.adapter_id):
                continue
            if entry.configured_id != family.configured_id:
                log.info(
                    "family %s: the configured adapter changed since %s was activated; "
                    "keeping the configured one",
                    family.family.id,
                    entry.adapter_id,
                )
                continue
            try:
                record = self.hold(self.path_of(entry.origin), entry.origin)
                if record.file_sha256 != entry.file_sha256 or record.id != entry.adapter_id:
                    raise AdapterError("the file changed since it was activated")
            except (AdapterError, APIError) as exc:
                message = exc.message if isinstance(exc, APIError) else str(exc)
                log.warning(
                    "family %s: not restoring adapter %s from %s: %s",
                    family.family.id,
                    entry.adapter_id,
                    entry.origin,
                    message,
                )
                if actor is not None:
                    self.audit.append(
                        actor, "reload", "refused", family=family.family.id,
                        adapter=entry.adapter_id, detail=message,
                    )  # fmt: skip
                continue
            previous, _ = family.activate(record.id)
            log.info("family %s: restored active adapter %s", family.family.id, record.id)
            if actor is not None:
                self.audit.append(
                    actor, "reload", "ok", family=family.family.id, adapter=record.id,
                    sha256=record.file_sha256,
                    detail=f"previous {previous.id if previous else 'none'}",
                )  # fmt: skip
                for listener in self.swap_listeners:
                    listener(family, record)
            restored.append(summary(record, family.active))
        return restored

    # ----- audited actions ------------------------------------------------------------------
    def list(self) -> dict[str, list[AdapterSummary]]:
        return {
            family.family.id: [summary(r, family.active) for r in family.records]
            for family in self.registry.families
        }

    def load(self, actor: str, relative: str) -> AdapterSummary:
        try:
            path = resolve_in_dir(self.adapter_dir, relative)
            record = self.hold(path, origin=str(path.relative_to(self.adapter_dir.resolve())))
        except APIError as exc:
            self.audit.append(actor, "load", "refused", detail=f"{relative}: {exc.message}")
            raise
        except AdapterError as exc:
            self.audit.append(actor, "load", "refused", detail=f"{relative}: {exc}")
            raise AdapterRefused(str(exc), param="path") from exc
        family = self._family_of(record.adapter)
        self.audit.append(
            actor,
            "load",
            "ok",
            family=family.family.id,
            adapter=record.id,
            sha256=record.file_sha256,
            detail=record.origin,
        )
        return summary(record, family.active)

    def upload(
        self, actor: str, filename: str, data: bytes, signature: Signature | None
    ) -> AdapterSummary:
        digest = bytes_sha256(data)
        try:
            if len(data) > self.max_upload_bytes:
                raise PayloadTooLarge(
                    f"the adapter is {len(data)} bytes; this server accepts at most "
                    f"{self.max_upload_bytes}"
                )
            stem = filename.removesuffix(ADAPTER_SUFFIX)
            if not _UPLOAD_NAME.match(stem):
                raise InvalidRequest(
                    "name must be 1-64 letters, digits, '.', '_' or '-'", param="name"
                )
            adapter, signer = self.verifier.open(data, filename, signature)
            family = self._family_of(adapter)
            adapter.check_fits(family.family)
            stored = f"{stem}-{digest[:12]}{ADAPTER_SUFFIX}"
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            target = self.uploads_dir / stored
            tmp = target.with_name(f".{stored}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
            if signature is not None:
                signature_path(target).write_text(signature.to_json() + "\n")
            record = family.add_bytes(data, adapter, origin=UPLOAD_PREFIX + stored, signer=signer)
        except APIError as exc:
            self.audit.append(
                actor, "upload", "refused", sha256=digest, detail=f"{filename}: {exc.message}"
            )
            raise
        except AdapterError as exc:
            self.audit.append(
                actor, "upload", "refused", sha256=digest, detail=f"{filename}: {exc}"
            )
            raise AdapterRefused(str(exc), param="file") from exc
        self.audit.append(
            actor,
            "upload",
            "ok",
            family=family.family.id,
            adapter=record.id,
            sha256=record.file_sha256,
            detail=record.origin,
        )
        return summary(record, family.active)

    @contextmanager
    def _refusals(self, actor: str, action: str, family: str, adapter_id: str) -> Iterator[None]:
        """Audit a refused `action` on a family's adapter and raise its API error."""
        try:
            yield
        except AdapterNotLoaded:
            owner = self._owner(adapter_id)
            if owner is not None:  # held, but by another family: it can never fit this one
                target = self.registry.family(family).family
                message = (
                    f"adapter {adapter_id!r} is an adapter of family {owner.family.id} "
                    f"({owner.family.alias}); family {target.id} ({target.alias}) cannot use it"
                )
                self.audit.append(
                    actor, action, "refused", family=family, adapter=adapter_id, detail=message
                )
                raise AdapterRefused(message, param="adapter") from None
            self.audit.append(
                actor, action, "refused", family=family, adapter=adapter_id, detail="not loaded"
            )
            raise NotFound(
                f"adapter {adapter_id!r} is not loaded for family {family!r}",
                param="adapter",
                code="adapter_not_found",
            ) from None
        except AdapterInUse as exc:
            self.audit.append(
                actor, action, "refused", family=family, adapter=adapter_id, detail=str(exc)
            )
            raise Conflict(str(exc), param="adapter", code="adapter_in_use") from exc
        except APIError as exc:
            self.audit.append(
                actor, action, "refused", family=family, adapter=adapter_id, detail=exc.message
            )
            raise

    def _owner(self, adapter_id: str) -> FamilyAdapters | None:
        """The served family holding an adapter with this id, if any."""
        for family in self.registry.families:
            if any(record.id == adapter_id for record in family.records):
                return family
        return None

    def activate(self, actor: str, family_name: str, adapter_id: str) -> AdapterSummary:
        with self._refusals(actor, "activate", family_name, adapter_id):
            family = self.registry.family(family_name)
            previous, record = family.activate(adapter_id)
        self.active_state.record(
            family.family.id,
            ActiveEntry(record.id, record.origin, record.file_sha256, family.configured_id),
        )
        self.audit.append(
            actor,
            "activate",
            "ok",
            family=family.family.id,
            adapter=record.id,
            sha256=record.file_sha256,
            detail=f"previous {previous.id if previous else 'none'}",
        )
        log.info("family %s: adapter %s active", family.family.id, record.id)
        for listener in self.swap_listeners:
            listener(family, record)
        return summary(record, family.active)

    def unload(self, actor: str, family_name: str, adapter_id: str) -> AdapterSummary:
        with self._refusals(actor, "unload", family_name, adapter_id):
            family = self.registry.family(family_name)
            record = family.unload(adapter_id)
        self.audit.append(
            actor,
            "unload",
            "ok",
            family=family.family.id,
            adapter=record.id,
            sha256=record.file_sha256,
        )
        return summary(record, family.active)
