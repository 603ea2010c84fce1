"""Turn a request's `safety` block into a steering row and the report the response carries."""

from __future__ import annotations

from safesteer.adapters.errors import UnknownCategory
from safesteer.server.auth import Principal
from safesteer.server.engine import RowGate, RowSteering
from safesteer.server.errors import InvalidRequest
from safesteer.server.policy import enforce_safety_policy
from safesteer.server.protocol import SafetyOptions, SafetyReport
from safesteer.server.registry import ServedModel

NO_STEERING = RowSteering(None, None)


def resolve_safety(
    served: ServedModel, options: SafetyOptions, principal: Principal
) -> tuple[RowSteering, SafetyReport]:
    """The steering for this request's rows and its report (`fired` is filled in later).

    Reads the served model's adapter once: the request keeps it whatever happens later. In
    `gated` mode the categories' weights apply only where their probes fire at the prefill.

    Raises:
        InvalidRequest: a category the adapter does not define, or `gated` without a gate.
        PermissionDenied: the principal may not lower what the request lowers.
    """
    record = served.adapter
    if record is None:
        if options.categories:
            name = next(iter(options.categories))
            raise InvalidRequest(
                f"model {served.name!r} is served without a safety adapter; "
                f"it has no category {name!r}",
                param=f"safety.categories.{name}",
                code="unknown_category",
            )
        return NO_STEERING, SafetyReport(
            family=served.loaded.family.id,
            adapter=None,
            sha256=None,
            mode="off",
            strength=0.0,
            categories={},
        )
    default_mode = "gated" if record.gate is not None else "always"
    options = replace_mode(options, options.mode or default_mode)
    if options.mode == "gated" and record.gate is None:
        raise InvalidRequest(
            f"adapter {record.id} has no gate; use mode 'always' or 'off'",
            param="safety.mode",
            code="no_gate",
        )
    basis = record.basis
    try:
        weights = basis.weights(options.categories)
    except UnknownCategory as exc:
        raise InvalidRequest(
            str(exc), param=f"safety.categories.{exc.category}", code="unknown_category"
        ) from exc
    defaults = dict(zip(basis.categories, basis.default_weights.tolist(), strict=True))
    enforce_safety_policy(principal, options, defaults, served.adapters.mandatory, default_mode)
    on = options.mode != "off"
    report = SafetyReport(
        family=served.loaded.family.id,
        adapter=record.id,
        sha256=record.adapter.payload_sha256,
        mode=str(options.mode),
        strength=options.strength if on else 0.0,
        categories={
            name: (float(w) if on else 0.0)
            for name, w in zip(basis.categories, weights.tolist(), strict=True)
        },
        fired=[] if options.mode == "gated" else None,
    )
    scaled = weights * options.strength
    if not on or not bool(scaled.any()):
        return NO_STEERING, report
    if options.mode == "always":
        return RowSteering(basis.table(scaled[None])[0], None), report
    assert record.gate is not None
    return RowSteering(None, RowGate(record.gate, basis, scaled)), report


def replace_mode(options: SafetyOptions, mode: str) -> SafetyOptions:
    return options if options.mode == mode else options.model_copy(update={"mode": mode})
