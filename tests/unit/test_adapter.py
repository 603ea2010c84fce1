"""`SafetyAdapter`: file round trip, tamper and format refusal, fit checks, structure, algebra."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from safesteer.adapters.adapter import (
    FORMAT_VERSION,
    AdapterMetadata,
    CategorySpec,
    SafetyAdapter,
    _payload_sha256,
)
from safesteer.adapters.errors import (
    AdapterFormatError,
    AdapterIntegrityError,
    AdapterMismatch,
    UnknownCategory,
)
from safesteer.adapters.family import ModelFamily

if TYPE_CHECKING:
    from conftest import AdapterFactory

FAMILY = ModelFamily("llama", 64, 4)
HIDDEN = FAMILY.hidden_size


@pytest.fixture
def adapter(random_adapter: AdapterFactory) -> SafetyAdapter:
    return random_adapter(FAMILY, layers=(1, 2), norm=2.0)


def _effective_or_zero(adapter: SafetyAdapter, category: str, layer: int) -> torch.Tensor:
    if category not in adapter.categories:
        return torch.zeros(HIDDEN)
    return adapter.effective(category, layer)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the parsed safesteer header of an adapter file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), json.loads(metadata["safesteer"])


def _write_file(path: Path, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> Path:
    save_file(dict(tensors), str(path), metadata={"safesteer": json.dumps(header)})
    return path


def _tensor_data_offset(path: Path) -> int:
    """Where the tensor bytes start: after the 8-byte header length and the JSON header."""
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + int(header_len)


# ----- round trip ------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, random_adapter: AdapterFactory) -> None:
    base = random_adapter(FAMILY, layers=(0, 3), seed=3)
    metadata = replace(
        base.metadata, base_fingerprint="ab" * 32, recipe={"method": "diff-of-means", "seed": 7}
    )
    original = SafetyAdapter(
        metadata, base.vectors, base.coefficients, {"violence": torch.randn(HIDDEN)}
    )

    path = original.save(tmp_path / "sub" / "tiny.safetensors")
    loaded = SafetyAdapter.load(path)

    assert path == tmp_path / "sub" / "tiny.safetensors"
    assert not path.with_name("tiny.safetensors.tmp").exists()
    assert loaded.metadata == original.metadata
    assert loaded.coefficients == original.coefficients
    assert loaded.layers == [0, 3]
    for category in original.categories:
        for layer in original.layers:
            assert torch.equal(loaded.vectors[category][layer], original.vectors[category][layer])
    assert loaded.conditions.keys() == {"violence"}
    assert torch.equal(loaded.conditions["violence"], original.conditions["violence"])
    assert loaded.payload_sha256 == original.payload_sha256
    assert loaded.id == original.id
    assert re.fullmatch(r"tiny@[0-9a-f]{12}", loaded.id)
    assert loaded.id == f"tiny@{original.steering_sha256[:12]}"
    assert loaded.steering_sha256 == original.steering_sha256


def test_the_id_changes_with_the_coefficients_and_the_payload_sha_does_not(
    adapter: SafetyAdapter,
) -> None:
    stronger = replace(
        adapter,
        coefficients={
            c: {la: 2 * k for la, k in per.items()} for c, per in adapter.coefficients.items()
        },
    )
    assert stronger.payload_sha256 == adapter.payload_sha256
    assert stronger.id != adapter.id
    assert stronger.id.split("@")[0] == adapter.id.split("@")[0]


def test_payload_sha256_is_stable_and_tracks_tensors(
    tmp_path: Path, adapter: SafetyAdapter
) -> None:
    first = SafetyAdapter.load(adapter.save(tmp_path / "a.safetensors"))
    second = SafetyAdapter.load(first.save(tmp_path / "b.safetensors"))

    assert re.fullmatch(r"[0-9a-f]{64}", adapter.payload_sha256)
    assert first.payload_sha256 == second.payload_sha256 == adapter.payload_sha256
    assert adapter.to_header()["payload_sha256"] == adapter.payload_sha256
    assert (2.0 * adapter).payload_sha256 != adapter.payload_sha256


def test_header_fields(adapter: SafetyAdapter) -> None:
    header = adapter.to_header()

    assert header["format_version"] == FORMAT_VERSION
    assert header["family"] == "llama-64x4"
    assert header["architecture"] == "llama"
    assert (header["hidden_size"], header["num_layers"]) == (64, 4)
    assert header["layer_convention"] == "decoder-output-0"
    assert header["coefficients"]["fraud"].keys() == {"1", "2"}
    assert header["categories"]["drugs"] == {"description": "drugs (test)", "default_weight": 0.0}


# ----- refused files ---------------------------------------------------------------------------


def test_flipped_tensor_bytes_raise_integrity_error(tmp_path: Path, adapter: SafetyAdapter) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    offset = _tensor_data_offset(path) + 17
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(AdapterIntegrityError, match="sha256"):
        SafetyAdapter.load(path)


def test_rewritten_tensor_with_old_header_raises_integrity_error(
    tmp_path: Path, adapter: SafetyAdapter
) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    tensors, header = _read_file(path)
    tensors["vector.violence.1"] = tensors["vector.violence.1"] * 1.5
    _write_file(path, tensors, header)

    with pytest.raises(AdapterIntegrityError):
        SafetyAdapter.load(path)


def test_removed_tensor_raises_integrity_error(tmp_path: Path, adapter: SafetyAdapter) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    tensors, header = _read_file(path)
    del tensors["vector.drugs.2"]
    _write_file(path, tensors, header)

    with pytest.raises(AdapterIntegrityError):
        SafetyAdapter.load(path)


def test_truncated_file_raises_format_error(tmp_path: Path, adapter: SafetyAdapter) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(AdapterFormatError, match="not a readable safetensors file"):
        SafetyAdapter.load(path)


def test_pickle_file_raises_format_error(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    torch.save({"vector.violence.1": torch.ones(HIDDEN)}, path)

    with pytest.raises(AdapterFormatError, match="not a readable safetensors file"):
        SafetyAdapter.load(path)


def test_missing_file_raises_format_error(tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="does not exist"):
        SafetyAdapter.load(tmp_path / "nope.safetensors")


def test_safetensors_without_safesteer_metadata_raises(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"vector.violence.1": torch.ones(HIDDEN)}, str(path), metadata={"other": "x"})

    with pytest.raises(AdapterFormatError, match="no 'safesteer' metadata"):
        SafetyAdapter.load(path)


def test_metadata_not_json_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"vector.violence.1": torch.ones(HIDDEN)}, str(path), metadata={"safesteer": "{"})

    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        SafetyAdapter.load(path)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version_raises(
    tmp_path: Path, adapter: SafetyAdapter, version: object
) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    tensors, header = _read_file(path)
    header["format_version"] = version
    _write_file(path, tensors, header)

    with pytest.raises(AdapterFormatError, match="format_version"):
        SafetyAdapter.load(path)


@pytest.mark.parametrize("key", ["categories", "coefficients", "payload_sha256", "hidden_size"])
def test_incomplete_metadata_raises(tmp_path: Path, adapter: SafetyAdapter, key: str) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    tensors, header = _read_file(path)
    del header[key]
    _write_file(path, tensors, header)

    with pytest.raises(AdapterFormatError, match="incomplete"):
        SafetyAdapter.load(path)


def test_unexpected_tensor_raises_format_error(tmp_path: Path, adapter: SafetyAdapter) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    tensors, header = _read_file(path)
    tensors["extra.weights"] = torch.ones(3)
    header["payload_sha256"] = _payload_sha256(tensors)  # a consistent, but foreign, file
    _write_file(path, tensors, header)

    with pytest.raises(AdapterFormatError, match=r"unexpected tensor 'extra\.weights'"):
        SafetyAdapter.load(path)


def test_bad_structure_in_file_names_file_not_path(tmp_path: Path, adapter: SafetyAdapter) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    tensors, header = _read_file(path)
    tensors["vector.violence.1"] = torch.ones(HIDDEN + 1)
    header["payload_sha256"] = _payload_sha256(tensors)
    _write_file(path, tensors, header)

    with pytest.raises(AdapterFormatError, match=r"^a\.safetensors: .*shape") as info:
        SafetyAdapter.load(path)

    assert str(tmp_path) not in str(info.value)


def test_scalar_tensor_in_file_raises_format_error(tmp_path: Path, adapter: SafetyAdapter) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    tensors, header = _read_file(path)
    tensors["vector.violence.1"] = torch.tensor(1.0)
    header["payload_sha256"] = _payload_sha256(tensors)  # a crafted file with a matching sha
    _write_file(path, tensors, header)

    with pytest.raises(AdapterFormatError):
        SafetyAdapter.load(path)


def test_non_finite_default_weight_raises_format_error(
    tmp_path: Path, adapter: SafetyAdapter
) -> None:
    path = adapter.save(tmp_path / "a.safetensors")
    tensors, header = _read_file(path)
    header["categories"]["violence"]["default_weight"] = float("nan")
    _write_file(path, tensors, header)

    with pytest.raises(AdapterFormatError):
        SafetyAdapter.load(path)


# ----- fit to a model family -------------------------------------------------------------------


def test_check_fits_own_family(adapter: SafetyAdapter) -> None:
    adapter.check_fits(FAMILY)  # no exception


@pytest.mark.parametrize(
    ("family", "field", "expected", "found"),
    [
        (ModelFamily("llama", 32, 4), "hidden_size", 32, 64),
        (ModelFamily("llama", 64, 6), "num_layers", 6, 4),
        (ModelFamily("mistral", 64, 4), "architecture", "mistral", "llama"),
    ],
)
def test_check_fits_refuses_other_family(
    adapter: SafetyAdapter, family: ModelFamily, field: str, expected: object, found: object
) -> None:
    with pytest.raises(AdapterMismatch) as info:
        adapter.check_fits(family)

    assert (info.value.field, info.value.expected, info.value.found) == (field, expected, found)
    message = str(info.value)
    assert field in message
    assert repr(expected) in message
    assert repr(found) in message


def test_check_fits_refuses_other_layer_convention(adapter: SafetyAdapter) -> None:
    other = replace(adapter, metadata=replace(adapter.metadata, layer_convention="decoder-input-0"))

    with pytest.raises(AdapterMismatch) as info:
        other.check_fits(FAMILY)

    assert info.value.field == "layer_convention"


def test_check_fits_on_tiny_model(
    tiny_model: PreTrainedModel, random_adapter: AdapterFactory
) -> None:
    family = ModelFamily.from_config(tiny_model.config)
    random_adapter(tiny_model).check_fits(family)
    other = ModelFamily("qwen2" if family.model_type != "qwen2" else "llama", 64, 4)
    with pytest.raises(AdapterMismatch, match="architecture"):
        random_adapter(tiny_model).check_fits(other)


# ----- structure validation --------------------------------------------------------------------


def _build(
    vectors: dict[str, dict[int, torch.Tensor]],
    coefficients: dict[str, dict[int, float]],
    categories: tuple[str, ...] = ("violence", "fraud"),
    conditions: dict[str, torch.Tensor] | None = None,
) -> SafetyAdapter:
    specs = {c: CategorySpec(c) for c in categories}
    metadata = AdapterMetadata.for_family("t", FAMILY, specs)
    return SafetyAdapter(metadata, vectors, coefficients, conditions or {})


def test_valid_structure_builds() -> None:
    adapter = _build({"violence": {0: torch.ones(HIDDEN)}}, {"violence": {0: 0.5}})

    assert adapter.layers == [0]
    assert adapter.categories == ["violence", "fraud"]


@pytest.mark.parametrize(
    ("vectors", "coefficients", "categories", "message"),
    [
        ({"violence": {1: torch.ones(HIDDEN - 1)}}, {"violence": {1: 1.0}}, None, "shape"),
        ({"violence": {1: torch.ones(1, HIDDEN)}}, {"violence": {1: 1.0}}, None, "shape"),
        ({"violence": {4: torch.ones(HIDDEN)}}, {"violence": {4: 1.0}}, None, "layer outside"),
        ({"violence": {-1: torch.ones(HIDDEN)}}, {"violence": {-1: 1.0}}, None, "layer outside"),
        (
            {"violence": {1: torch.full((HIDDEN,), float("nan"))}},
            {"violence": {1: 1.0}},
            None,
            "non-finite",
        ),
        (
            {"violence": {1: torch.full((HIDDEN,), float("inf"))}},
            {"violence": {1: 1.0}},
            None,
            "non-finite",
        ),
        ({"violence": {1: torch.ones(HIDDEN)}}, {}, None, "no finite coefficient"),
        ({"violence": {1: torch.ones(HIDDEN)}}, {"violence": {2: 1.0}}, None, "coefficient"),
        (
            {"violence": {1: torch.ones(HIDDEN)}},
            {"violence": {1: float("nan")}},
            None,
            "no finite coefficient",
        ),
        ({"weapons": {1: torch.ones(HIDDEN)}}, {"weapons": {1: 1.0}}, None, "not in metadata"),
        ({}, {}, ("Violence",), "must match"),
        ({}, {}, ("self-harm",), "must match"),
        ({}, {}, ("violence.1",), "must match"),
    ],
)
def test_bad_structure_raises(
    vectors: dict[str, dict[int, torch.Tensor]],
    coefficients: dict[str, dict[int, float]],
    categories: tuple[str, ...] | None,
    message: str,
) -> None:
    with pytest.raises(AdapterFormatError, match=message):
        _build(vectors, coefficients, categories or ("violence", "fraud"))


def test_bad_condition_raises() -> None:
    with pytest.raises(AdapterFormatError, match="condition"):
        _build({}, {}, conditions={"violence": torch.ones(2, HIDDEN)})
    with pytest.raises(AdapterFormatError, match="not in metadata"):
        _build({}, {}, conditions={"weapons": torch.ones(HIDDEN)})


def test_nonpositive_sizes_raise() -> None:
    metadata = AdapterMetadata.for_family("t", ModelFamily("llama", 0, 4), {})
    with pytest.raises(AdapterFormatError, match="positive"):
        SafetyAdapter(metadata, {}, {})


# ----- views -----------------------------------------------------------------------------------


def test_effective_is_coefficient_times_vector(adapter: SafetyAdapter) -> None:
    for category in adapter.categories:
        for layer in adapter.layers:
            expected = adapter.coefficients[category][layer] * adapter.vectors[category][layer]
            assert torch.equal(adapter.effective(category, layer), expected)
    assert torch.equal(adapter.effective("violence", 0), torch.zeros(HIDDEN))
    with pytest.raises(UnknownCategory) as info:
        adapter.effective("weapons", 1)
    assert info.value.category == "weapons"


def test_effective_of_declared_category_without_vectors_is_zero() -> None:
    adapter = _build({"violence": {1: torch.ones(HIDDEN)}}, {"violence": {1: 1.0}})

    assert torch.equal(adapter.effective("fraud", 1), torch.zeros(HIDDEN))


def test_norms(adapter: SafetyAdapter) -> None:
    norms = adapter.norms()

    assert norms.keys() == {"violence", "fraud", "drugs"}
    for category, per_layer in norms.items():
        assert per_layer.keys() == {1, 2}
        for layer, value in per_layer.items():
            vector = adapter.vectors[category][layer].tolist()
            coef = adapter.coefficients[category][layer]
            by_hand = sum((coef * x) ** 2 for x in vector) ** 0.5
            # The fixture scales each vector to norm 2.0, so the norm is 2 * coefficient.
            assert value == pytest.approx(by_hand, rel=1e-5)
            assert value == pytest.approx(2.0 * coef, rel=1e-5)


def test_norms_of_hand_built_adapter() -> None:
    adapter = _build(
        {"violence": {0: torch.tensor([3.0, 4.0] + [0.0] * (HIDDEN - 2))}},
        {"violence": {0: 2.0}},
    )

    assert adapter.norms() == {"violence": {0: 10.0}}


# ----- algebra ---------------------------------------------------------------------------------


@pytest.fixture
def pair(random_adapter: AdapterFactory) -> tuple[SafetyAdapter, SafetyAdapter]:
    """Two adapters of one family, overlapping in one category and one layer."""
    a = random_adapter(FAMILY, name="a", categories=("violence", "fraud"), layers=(1, 2), seed=1)
    b = random_adapter(FAMILY, name="b", categories=("fraud", "drugs"), layers=(2, 3), seed=2)
    return a, b


def _snapshot(adapter: SafetyAdapter) -> dict[tuple[str, int], torch.Tensor]:
    return {
        (category, layer): vector.clone()
        for category, per_layer in adapter.vectors.items()
        for layer, vector in per_layer.items()
    }


def _unchanged(adapter: SafetyAdapter, snapshot: dict[tuple[str, int], torch.Tensor]) -> bool:
    return _snapshot(adapter).keys() == snapshot.keys() and all(
        torch.equal(adapter.vectors[c][la], v) for (c, la), v in snapshot.items()
    )


def test_add_is_additive_in_effective(pair: tuple[SafetyAdapter, SafetyAdapter]) -> None:
    a, b = pair
    before_a, before_b, meta_a = _snapshot(a), _snapshot(b), a.metadata

    total = a + b

    assert total is not a and total is not b
    assert set(total.categories) == {"violence", "fraud", "drugs"}
    assert total.layers == [1, 2, 3]
    for category in ("violence", "fraud", "drugs"):
        for layer in range(FAMILY.num_layers):
            expected = _effective_or_zero(a, category, layer) + _effective_or_zero(
                b, category, layer
            )
            assert torch.equal(total.effective(category, layer), expected), (category, layer)
    assert _unchanged(a, before_a) and _unchanged(b, before_b)
    assert a.metadata is meta_a and a.categories == ["violence", "fraud"]


def test_scalar_multiplication(adapter: SafetyAdapter) -> None:
    before = _snapshot(adapter)

    doubled = 2 * adapter
    scaled = adapter * 0.3
    halved = adapter / 4

    assert doubled is not adapter
    for category in adapter.categories:
        for layer in adapter.layers:
            effective = adapter.effective(category, layer)
            assert torch.equal(doubled.effective(category, layer), 2 * effective)
            torch.testing.assert_close(scaled.effective(category, layer), 0.3 * effective)
            torch.testing.assert_close(halved.effective(category, layer), effective / 4)
            assert torch.equal((-adapter).effective(category, layer), -effective)
    assert doubled.metadata == adapter.metadata
    assert _unchanged(adapter, before)


def test_subtracting_itself_is_zero(adapter: SafetyAdapter) -> None:
    before = _snapshot(adapter)

    zero = adapter - adapter

    for category in adapter.categories:
        for layer in range(FAMILY.num_layers):
            assert torch.count_nonzero(zero.effective(category, layer)) == 0
    assert all(value == 0.0 for per in zero.norms().values() for value in per.values())
    assert _unchanged(adapter, before)


def test_add_then_subtract_recovers(pair: tuple[SafetyAdapter, SafetyAdapter]) -> None:
    a, b = pair

    back = (a + b) - b

    for category in a.categories:
        for layer in a.layers:
            torch.testing.assert_close(
                back.effective(category, layer), a.effective(category, layer)
            )


def test_adding_other_family_raises(adapter: SafetyAdapter, random_adapter: AdapterFactory) -> None:
    other = random_adapter(ModelFamily("llama", 64, 6))

    with pytest.raises(AdapterMismatch) as info:
        adapter + other

    assert info.value.field == "family"
    assert (info.value.expected, info.value.found) == ("llama-64x4", "llama-64x6")


def test_adding_a_non_adapter_is_a_type_error(adapter: SafetyAdapter) -> None:
    with pytest.raises(TypeError):
        adapter + 1  # type: ignore[operator]
