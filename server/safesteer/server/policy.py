"""Who may change which safety setting.

- `client` keys may add or strengthen categories, never lower one below its default;
  they cannot use a strength below 1 or a mode that steers less than the default
  (`off` < `gated` < `always`).
- `override` keys may lower or switch off categories and use `mode: "off"`, except the
  family's mandatory categories, which stay at or above their floors for every key.
- `admin` keys may do anything.
A refusal names the category (or field) it is about.
"""

from __future__ import annotations

from collections.abc import Mapping

from safesteer.server.auth import Principal
from safesteer.server.errors import PermissionDenied
from safesteer.server.protocol import SafetyOptions

MODE_STRENGTH = {"off": 0, "gated": 1, "always": 2}


def enforce_safety_policy(
    principal: Principal,
    options: SafetyOptions,
    defaults: Mapping[str, float],
    mandatory: Mapping[str, float],
    default_mode: str,
) -> None:
    """Raise PermissionDenied if `principal` may not send these safety options.

    `options.mode` is resolved (never None); `defaults`: each category's default weight;
    `mandatory`: the family's floors; `default_mode`: the adapter's default mode (`always`
    steers more than `gated`, which steers more than `off`).
    """
    if "admin" in principal.scopes:
        return
    mode = str(options.mode)
    if not principal.can("override"):
        if MODE_STRENGTH[mode] < MODE_STRENGTH[default_mode]:
            raise PermissionDenied(
                f"mode {mode!r} steers less than the default {default_mode!r}; it needs an "
                "API key with the 'override' scope",
                param="safety.mode",
            )
        if options.strength < 1.0:
            raise PermissionDenied(
                "a strength below 1 lowers every category; it needs the 'override' scope",
                param="safety.strength",
            )
        for category, weight in options.categories.items():
            if weight < defaults.get(category, 0.0):
                raise PermissionDenied(
                    f"lowering category {category!r} below its default "
                    f"{defaults[category]:g} needs the 'override' scope",
                    param=f"safety.categories.{category}",
                )
    for category, floor in mandatory.items():
        if options.mode == "off":
            raise PermissionDenied(
                f"category {category!r} is mandatory for this model; safety cannot be switched off",
                param="safety.mode",
            )
        weight = options.categories.get(category, defaults.get(category, 0.0))
        if weight * options.strength < floor:
            raise PermissionDenied(
                f"category {category!r} is mandatory for this model with a floor of "
                f"{floor:g}; the request asks for {weight * options.strength:g}",
                param=f"safety.categories.{category}",
            )
