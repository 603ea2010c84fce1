"""Server state on disk: the active adapter per family (atomic JSON) and the JSONL audit log."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ACTIVE_FILE = "active_adapters.json"
AUDIT_FILE = "audit.jsonl"
UPLOADS_DIR = "uploads"


def write_json_atomically(path: Path, payload: Any) -> None:
    """Write to a unique temporary file in the same folder, fsync, then rename over `path`.

    Unique names matter: pods sharing a state volume all run as pid 1.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ActiveEntry:
    """What was active for a family: enough to find and check it again after a restart."""

    adapter_id: str
    origin: str
    file_sha256: str
    configured_id: str | None = None  # the configured default it replaced


class ActiveState:
    """`<state_dir>/active_adapters.json`: family id -> the adapter activated last."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / ACTIVE_FILE
        self._lock = threading.Lock()

    def read(self) -> dict[str, ActiveEntry]:
        try:
            raw = json.loads(self.path.read_text())
            return {family: ActiveEntry(**entry) for family, entry in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return {}

    def record(self, family: str, entry: ActiveEntry) -> None:
        with self._lock:
            state = self.read()
            state[family] = entry
            write_json_atomically(self.path, {name: asdict(value) for name, value in state.items()})


@dataclass(frozen=True)
class AuditEntry:
    time: str
    actor: str
    action: str
    outcome: str  # "ok" or "refused"
    family: str | None = None
    adapter: str | None = None
    sha256: str | None = None
    detail: str | None = None


class AuditLog:
    """Append-only JSONL: one line per admin action, flushed and fsynced before returning."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / AUDIT_FILE
        self._lock = threading.Lock()

    def append(self, actor: str, action: str, outcome: str, **fields: str | None) -> AuditEntry:
        entry = AuditEntry(
            time=datetime.now(UTC).isoformat(timespec="milliseconds"),
            actor=actor,
            action=action,
            outcome=outcome,
            **fields,
        )
        line = json.dumps({k: v for k, v in asdict(entry).items() if v is not None})
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        return entry

    def tail(self, limit: int) -> list[dict[str, Any]]:
        try:
            with self.path.open() as handle:
                lines = deque(handle, maxlen=limit)
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]
