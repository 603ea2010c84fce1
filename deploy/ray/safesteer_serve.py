"""safesteer on Ray Serve: the same FastAPI app as replicas, admin changes kept in sync.

Every replica runs `create_app(settings, server)`, the app `safesteer serve` runs: the OpenAI
routes, API keys, the admin API, /health, /ready and /metrics. The Serve proxy spreads requests
over the replicas (one per node with `max_replicas_per_node: 1`).

An admin change made through any replica reaches every replica. The replica that handled an
admin request (load, upload, activate, unload) publishes the change, after it succeeded there,
to the `AdapterSync` deployment, which numbers the changes. Every replica long-polls
`AdapterSync` and applies the changes it has not seen, in order, through its own
`AdapterAdmin`: files are verified (signatures included) as for any admin load; uploads travel
with the change, since each replica keeps them in its own state folder. Applied changes are
audited on each replica with the actor `ray-sync`. A replica that starts later (autoscaling, a
restart) applies the current state before its first request.

Propagation takes milliseconds, but it is not instantaneous: an `activate` that reaches a
replica before the `load` of the same adapter did answers 404; `GET /admin/sync` (admin scope)
shows the version a replica has applied. Each response names its replica in the
`X-Safesteer-Replica` header.

    serve run deploy/ray/serve_config.yaml            # the module must be on PYTHONPATH
    serve run --app-dir deploy/ray safesteer_serve:app_builder num_replicas=2
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from safesteer.server.access import require_admin
from safesteer.server.adapter_admin import UPLOAD_PREFIX, AdapterAdmin, AdapterSummary
from safesteer.server.app import create_app
from safesteer.server.auth import Principal
from safesteer.server.errors import NotFound
from safesteer.server.settings import Settings
from safesteer.server.startup import build_server

log = logging.getLogger("safesteer.ray")
SYNC_DEPLOYMENT = "AdapterSync"
SERVER_DEPLOYMENT = "SafesteerServer"
SYNC_ACTOR = "ray-sync"
REPLICA_HEADER = "X-Safesteer-Replica"
POLL_WAIT_S = 20.0  # one long poll; a change wakes every waiting replica at once
RETRY_S = 1.0

Change = dict[str, Any]  # {"kind": load|activate|unload, "family", "adapter_id", ...}


def change_key(change: Change) -> str:
    """Changes with the same key supersede each other (an unload supersedes its load)."""
    if change["kind"] == "activate":
        return f"active/{change['family']}"
    return f"adapter/{change['family']}/{change['adapter_id']}"


@serve.deployment(
    name=SYNC_DEPLOYMENT,
    num_replicas=1,
    max_ongoing_requests=1000,  # every server replica holds one long poll open
    ray_actor_options={"num_cpus": 0},
)
class AdapterSync:
    """The cluster's record of admin changes: per key, the latest, numbered."""

    def __init__(self) -> None:
        self._version = 0
        self._latest: dict[str, Change] = {}
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # made on the replica's event loop, at first use
            self._changed = asyncio.Condition()
        return self._changed

    async def publish(self, change: Change) -> int:
        """Record a change; returns its version."""
        condition = self._condition()
        async with condition:
            self._version += 1
            self._latest[change_key(change)] = {**change, "version": self._version}
            condition.notify_all()
            return self._version

    async def since(self, version: int, wait_s: float = 0.0) -> dict[str, Any]:
        """Changes newer than `version`, oldest first, waiting up to `wait_s` for one."""
        condition = self._condition()
        async with condition:
            if self._version <= version and wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        condition.wait_for(lambda: self._version > version), wait_s
                    )
            changes = sorted(
                (c for c in self._latest.values() if c["version"] > version),
                key=lambda c: int(c["version"]),
            )
            return {"version": self._version, "changes": changes}


class ClusterAdapterAdmin:
    """The admin service the routes see on a replica: the local one, plus publishing.

    Every successful load, upload, activation or unload is queued for `AdapterSync`; one task
    sends the queue in order, so other replicas apply a load before the activation after it.
    """

    def __init__(self, local: AdapterAdmin, sync: DeploymentHandle, replica: str) -> None:
        self.local = local
        self.sync = sync
        self.replica = replica
        self.version = 0  # the newest change this replica has applied
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[Change] | None = None

    def __getattr__(self, name: str) -> Any:  # list, audit, ...: the local service's
        return getattr(self.local, name)

    # ----- the admin calls the routes make -------------------------------------------------
    def load(self, actor: str, relative: str) -> AdapterSummary:
        summary = self.local.load(actor, relative)
        self._publish(self._change("load", summary))
        return summary

    def upload(self, actor: str, filename: str, data: bytes, signature: Any) -> AdapterSummary:
        summary = self.local.upload(actor, filename, data, signature)
        self._publish(self._change("load", summary))
        return summary

    def activate(self, actor: str, family_name: str, adapter_id: str) -> AdapterSummary:
        summary = self.local.activate(actor, family_name, adapter_id)
        self._publish(self._change("activate", summary))
        return summary

    def unload(self, actor: str, family_name: str, adapter_id: str) -> AdapterSummary:
        summary = self.local.unload(actor, family_name, adapter_id)
        self._publish(self._change("unload", summary, with_file=False))
        return summary

    # ----- publishing ----------------------------------------------------------------------
    def _change(self, kind: str, summary: AdapterSummary, *, with_file: bool = True) -> Change:
        change: Change = {
            "kind": kind,
            "family": summary.family,
            "adapter_id": summary.id,
            "origin": summary.origin,
            "sha256": summary.sha256,
            "replica": self.replica,
        }
        if with_file and summary.origin.startswith(UPLOAD_PREFIX):
            # Uploads live in this replica's state folder only: ship the file (adapters are
            # small) and its signature; the other replicas verify and store it themselves.
            path = self.local.path_of(summary.origin)
            change["content_base64"] = base64.b64encode(path.read_bytes()).decode()
            signature = path.with_name(path.name + ".sig")
            if signature.is_file():
                change["signature"] = signature.read_text()
        return change

    def _publish(self, change: Change) -> None:
        # Sync routes run in a thread pool, async ones on the loop: hand over thread-safely.
        if self._loop is None or self._outbox is None:
            raise RuntimeError("adapter sync is not started")
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, change)

    async def _send(self) -> None:
        assert self._outbox is not None
        while True:
            change = await self._outbox.get()
            for attempt in range(1, 6):
                try:
                    version = await self.sync.publish.remote(change)
                    log.info(
                        "published %s %s (%s) as version %d",
                        change["kind"],
                        change["adapter_id"],
                        change["family"],
                        version,
                    )
                    break
                except Exception:  # Ray raises several error types; retry any of them
                    log.exception("publishing a change failed (attempt %d)", attempt)
                    await asyncio.sleep(RETRY_S)

    # ----- applying ------------------------------------------------------------------------
    def _store_upload(self, change: Change) -> None:
        name = change["origin"].removeprefix(UPLOAD_PREFIX)
        target = self.local.uploads_dir / name
        if target.parent != self.local.uploads_dir or name.startswith("."):
            raise ValueError(f"bad upload name {name!r}")
        if target.is_file():
            return
        self.local.uploads_dir.mkdir(parents=True, exist_ok=True)
        if "signature" in change:
            target.with_name(name + ".sig").write_text(change["signature"])
        staging = target.with_name(f".{name}.{os.getpid()}.tmp")
        staging.write_bytes(base64.b64decode(change["content_base64"]))
        staging.replace(target)

    def _hold(self, change: Change) -> None:
        family = self.local.registry.family(change["family"])
        if any(record.id == change["adapter_id"] for record in family.records):
            return
        if "content_base64" in change:
            self._store_upload(change)
        record = self.local.hold(self.local.path_of(change["origin"]), change["origin"])
        if record.id != change["adapter_id"] or record.file_sha256 != change["sha256"]:
            raise ValueError(
                f"{change['origin']} here is {record.id} (sha256 {record.file_sha256[:12]}), "
                f"not {change['adapter_id']} (sha256 {change['sha256'][:12]})"
            )
        self.local.audit.append(
            SYNC_ACTOR,
            "load",
            "ok",
            family=change["family"],
            adapter=record.id,
            sha256=record.file_sha256,
            detail=f"{record.origin} (from replica {change['replica']})",
        )

    def apply(self, change: Change) -> None:
        """Make this replica agree with `change`. Raises when it cannot."""
        if change["kind"] == "unload":
            with contextlib.suppress(NotFound):  # never held here: nothing to do
                self.local.unload(SYNC_ACTOR, change["family"], change["adapter_id"])
            return
        self._hold(change)
        if change["kind"] == "activate":
            active = self.local.registry.family(change["family"]).active
            if active is None or active.id != change["adapter_id"]:
                self.local.activate(SYNC_ACTOR, change["family"], change["adapter_id"])

    async def catch_up(self, wait_s: float) -> None:
        update = await self.sync.since.remote(self.version, wait_s)
        for change in update["changes"]:
            if change["replica"] == self.replica:
                continue  # made here
            try:
                self.apply(change)
                log.info(
                    "applied version %d: %s %s (%s)",
                    change["version"],
                    change["kind"],
                    change["adapter_id"],
                    change["family"],
                )
            except Exception as exc:  # keep serving with what is active; say why
                message = getattr(exc, "message", None) or str(exc)
                log.error(
                    "cannot apply version %d (%s %s): %s",
                    change["version"],
                    change["kind"],
                    change["adapter_id"],
                    message,
                )
                self.local.audit.append(
                    SYNC_ACTOR,
                    change["kind"],
                    "refused",
                    family=change["family"],
                    adapter=change["adapter_id"],
                    sha256=change["sha256"],
                    detail=message,
                )
        self.version = max(self.version, int(update["version"]))

    async def _poll(self) -> None:
        while True:
            try:
                await self.catch_up(POLL_WAIT_S)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("adapter sync poll failed; retrying")
                await asyncio.sleep(RETRY_S)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Catch up with the cluster, then publish and poll until the app stops."""
        self._loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue()
        await self.catch_up(0.0)
        tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._poll())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def build_replica_app(settings_fields: dict[str, Any], sync_handle: DeploymentHandle) -> FastAPI:
    """The ASGI app of one replica (runs on the replica, when Serve starts it)."""
    replica = serve.get_replica_context().replica_id.unique_id
    settings = Settings(**settings_fields)
    server = build_server(settings)  # loads the models now: the replica is ready when it is
    app = create_app(settings, server)
    cluster_admin = ClusterAdapterAdmin(server.admin, sync_handle, replica)
    served_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with served_lifespan(app), cluster_admin.running():
            app.state.admin = cluster_admin  # the admin routes now publish what they change
            yield

    app.router.lifespan_context = lifespan

    @app.middleware("http")
    async def name_replica(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    @app.get("/admin/sync")
    async def sync_state(_: Annotated[Principal, Depends(require_admin)]) -> dict[str, Any]:
        return {
            "replica": replica,
            "version": cluster_admin.version,
            "active": {
                family.family.id: family.active.id if family.active else None
                for family in server.registry.families
            },
        }

    return app


@serve.deployment(
    name=SERVER_DEPLOYMENT,
    num_replicas=2,
    max_replicas_per_node=1,
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class SafesteerServer:
    """The ingress deployment: one safesteer app per replica, built after `__init__`."""

    def __init__(self, sync: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.sync = sync
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_replica_app(self.settings, self.sync)


class AppArgs(BaseModel):
    """Arguments of `app_builder` (the `args:` of a Serve config, or `key=value` on the CLI)."""

    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="safesteer Settings fields (the `safesteer serve` flags, snake_case); "
        "SAFESTEER_* variables in the replicas' environment apply too.",
    )
    num_replicas: int = Field(2, ge=1, description="Server replicas.")
    max_replicas_per_node: int | None = Field(1, ge=1, description="At most this many per node.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per server replica.")


def app_builder(args: dict[str, Any]) -> Application:
    """The Serve application: `SafesteerServer` replicas plus the `AdapterSync` deployment.

    A Serve config's `deployments:` section overrides these options by deployment name.
    """
    options = AppArgs.model_validate(args)
    server = SafesteerServer.options(
        num_replicas=options.num_replicas,
        max_replicas_per_node=options.max_replicas_per_node,
        ray_actor_options={"num_cpus": options.num_cpus},
    )
    return server.bind(AdapterSync.bind(), options.settings)
