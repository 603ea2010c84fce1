"""The admin API under `/admin`: adapters per family, load, upload, activate, unload, audit.

Every endpoint needs an API key with the `admin` scope (or local mode).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from safesteer.adapters.signing import Signature, SignatureError
from safesteer.server.access import require_admin
from safesteer.server.adapter_admin import AdapterAdmin, AdapterSummary
from safesteer.server.auth import Principal
from safesteer.server.errors import InvalidRequest

admin_router = APIRouter(prefix="/admin")
Admin = Annotated[Principal, Depends(require_admin)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadRequest(_Body):
    path: str = Field(description="Adapter file, relative to the server's adapter folder.")


class UploadRequest(_Body):
    name: str = Field(description="File name to store the adapter under (.safetensors).")
    content_base64: str = Field(description="The adapter file, base64.")
    signature: dict[str, Any] | None = Field(None, description="The `.sig` file's JSON.")


class ActivateRequest(_Body):
    adapter: str = Field(description="Id of a loaded adapter of this family.")


def admin(request: Request) -> AdapterAdmin:
    service: AdapterAdmin = request.app.state.admin
    return service


def _summary(item: AdapterSummary) -> dict[str, Any]:
    return asdict(item)


@admin_router.get("/adapters")
async def list_adapters(request: Request, _: Admin) -> dict[str, Any]:
    listing = admin(request).list()
    return {"families": {family: [_summary(s) for s in items] for family, items in listing.items()}}


@admin_router.post("/adapters/load")
def load_adapter(body: LoadRequest, request: Request, who: Admin) -> dict[str, Any]:
    return _summary(admin(request).load(who.name, body.path))


@admin_router.post("/adapters/upload")
def upload_adapter(body: UploadRequest, request: Request, who: Admin) -> dict[str, Any]:
    try:
        data = base64.b64decode(body.content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("content_base64 is not valid base64", param="content_base64") from None
    signature: Signature | None = None
    if body.signature is not None:
        try:
            signature = Signature.from_json(json.dumps(body.signature))
        except SignatureError as exc:
            raise InvalidRequest(str(exc), param="signature") from exc
    return _summary(admin(request).upload(who.name, body.name, data, signature))


@admin_router.post("/families/{family}/activate")
def activate_adapter(
    family: str, body: ActivateRequest, request: Request, who: Admin
) -> dict[str, Any]:
    return _summary(admin(request).activate(who.name, family, body.adapter))


@admin_router.delete("/families/{family}/adapters/{adapter_id}")
def unload_adapter(family: str, adapter_id: str, request: Request, who: Admin) -> dict[str, Any]:
    return _summary(admin(request).unload(who.name, family, adapter_id))


@admin_router.post("/reload-state")
def reload_state(request: Request, who: Admin) -> dict[str, Any]:
    """Re-read the state file (shared by replicas) and activate what it records."""
    return {"restored": [_summary(s) for s in admin(request).restore_active(who.name)]}


@admin_router.get("/audit")
def audit_log(
    request: Request, _: Admin, limit: Annotated[int, Query(ge=1, le=10000)] = 100
) -> dict[str, Any]:
    return {"entries": admin(request).audit.tail(limit)}
