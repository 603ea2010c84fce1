"""Turn a request's `safety` block into a steering row and the report the response carries."""

from __future__ import annotations

import torch

from safesteer.adapters.errors import UnknownCategory
from safesteer.server.errors import InvalidRequest
from safesteer.server.protocol import SafetyOptions, SafetyReport
from safesteer.server.registry import ServedModel


def resolve_safety(
    served: ServedModel, options: SafetyOptions
) -> tuple[torch.Tensor | None, SafetyReport]:
    """The `[hook layers, hidden]` steering for this request (None: none) and its report.

    Raises:
        InvalidRequest: a category the active adapter does not define.
    """
    snapshot = served.snapshot
    if snapshot is None:
        if options.categories:
            name = next(iter(options.categories))
            raise InvalidRequest(
                f"model {served.name!r} is served without a safety adapter; "
                f"it has no category {name!r}",
                param=f"safety.categories.{name}",
                code="unknown_category",
            )
        return None, SafetyReport(
            adapter=None, sha256=None, mode="off", strength=0.0, categories={}
        )
    adapter = snapshot.adapter
    try:
        weights = snapshot.basis.weights(options.categories)
    except UnknownCategory as exc:
        raise InvalidRequest(
            str(exc), param=f"safety.categories.{exc.category}", code="unknown_category"
        ) from exc
    applied = {
        name: (float(w) if options.mode == "always" else 0.0)
        for name, w in zip(snapshot.basis.categories, weights.tolist(), strict=True)
    }
    report = SafetyReport(
        adapter=adapter.id,
        sha256=adapter.payload_sha256,
        mode=options.mode,
        strength=options.strength if options.mode == "always" else 0.0,
        categories=applied,
    )
    strength = options.strength
    if options.mode == "off" or strength == 0.0 or not any(applied.values()):
        return None, report
    return snapshot.basis.table((weights * strength)[None])[0], report
