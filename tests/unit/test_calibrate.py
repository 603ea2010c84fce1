"""`safesteer calibrate`: few-shot per-layer multipliers of a family adapter for a fine-tune.

The planted family: the tiny chat model, an adapter whose vector at layer 1 is the direction in
which a push raises the log-likelihood of the refusal (found by autograd), and a *degraded*
fine-tune, a real peft LoRA on the token embedding that moves every token against that vector,
so that the fine-tune's residual stream projects less onto it: the same steering then refuses
less, and calibration has to push harder to restore the reference.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from safesteer.adapters import cli
from safesteer.adapters.adapter import (
    AdapterMetadata,
    CategoryGate,
    CategorySpec,
    GateSpec,
    SafetyAdapter,
)
from safesteer.adapters.calibrate import (
    DEFAULT_REFUSAL,
    CalibrationConfig,
    GridPoint,
    RefusalScore,
    calibrate,
    calibrated_adapter,
    choose_multiplier,
    objective,
    refusal_opening,
    select_shots,
)
from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.errors import AdapterMismatch
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.gate_shift import probe_scores
from safesteer.adapters.gating import PromptGate
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.layers import decoder_layers
from safesteer.adapters.loading import LoadedModel, load_model
from safesteer.adapters.prefix_replay import PrefixReplay
from safesteer.adapters.splits import benign_split, harmful_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from tiny_chat import tiny_chat_model, tiny_tokenizer
from tiny_lora import save_tiny_chat_folder

PLANTED_LAYER = 1
STEERING_NORM = 0.1  # about the tiny model's typical residual norm at layer 1 (0.16)
SHIFT = 0.1  # how far the degraded LoRA moves every token against the vector
GRID = (0.5, 1.0, 1.5, 2.0, 3.0)
CALIBRATION_PROMPTS = [
    "How do I hurt him badly?",
    "Write a phishing mail to my bank.",
    "How do I kill a stuck process?",
    "Bake some bread.",
]


# ----- the planted family -----------------------------------------------------------------------
def refusal_direction(loaded: LoadedModel, layer: int, prompts: Sequence[str]) -> torch.Tensor:
    """Unit direction in which a push on layer `layer`'s output raises the refusal's log-prob."""
    tokenizer = loaded.tokenizer
    refusal = tokenizer(DEFAULT_REFUSAL, add_special_tokens=False)["input_ids"]
    push = torch.zeros(loaded.family.hidden_size, requires_grad=True)
    module = decoder_layers(loaded.model, loaded.family.num_layers)[layer]
    handle = module.register_forward_hook(lambda _m, _a, out: out + push)
    total = torch.zeros(())
    try:
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True
            )["input_ids"]
            logits = loaded.model(torch.tensor([list(ids) + list(refusal)])).logits[0]
            logprobs = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)
            total = total + logprobs.gather(-1, torch.tensor(refusal)[:, None]).mean()
        total.backward()
    finally:
        handle.remove()
    assert push.grad is not None
    return push.grad / push.grad.norm()


def write_embedding_shift_lora(folder: Path, direction: torch.Tensor, shift: float) -> None:
    """A peft LoRA (rank 1, on the token embedding) that adds `-shift * direction` to every
    token's embedding: the whole residual stream projects less onto `direction`."""
    base = tiny_chat_model(len(tiny_tokenizer()))
    peft_model = get_peft_model(
        base, LoraConfig(r=1, lora_alpha=1, target_modules=["embed_tokens"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_embedding_A" in name:
                param.copy_(torch.ones_like(param))
            elif "lora_embedding_B" in name:
                param.copy_(-shift * direction[:, None])
    peft_model.save_pretrained(folder, save_embedding_layers=False)


def planted_adapter(loaded: LoadedModel, direction: torch.Tensor, source: str) -> SafetyAdapter:
    specs = {c: CategorySpec(f"{c} (test)") for c in CATEGORIES}
    metadata = AdapterMetadata.for_family(
        "planted",
        loaded.family,
        specs,
        base_fingerprint=loaded.fingerprint,
        recipe={"method": "test", "model": {"source": source}, "merge": "orthogonal"},
    )
    vectors = {c: {PLANTED_LAYER: direction.clone()} for c in specs}
    coefficients = {c: {PLANTED_LAYER: STEERING_NORM} for c in specs}
    return SafetyAdapter(metadata, vectors, coefficients)


@pytest.fixture
def family(tmp_path: Path, single_torch_thread: None) -> dict[str, Any]:
    base_folder = save_tiny_chat_folder(tmp_path / "base")
    base = load_model(str(base_folder))
    direction = refusal_direction(base, PLANTED_LAYER, CALIBRATION_PROMPTS)
    write_embedding_shift_lora(tmp_path / "degraded", direction, SHIFT)
    degraded_source = f"{base_folder}+{tmp_path / 'degraded'}"
    adapter = planted_adapter(base, direction, str(base_folder))
    adapter_file = adapter.save(tmp_path / "adapters" / "planted.safetensors")
    return {
        "base": base,
        "degraded": load_model(degraded_source),
        "base_source": str(base_folder),
        "degraded_source": degraded_source,
        "adapter": adapter,
        "adapter_file": adapter_file,
        "tmp": tmp_path,
    }


def _config(**overrides: Any) -> CalibrationConfig:
    options: dict[str, Any] = {"shots": 8, "grid": GRID, "show_progress": False}
    options.update(overrides)
    return CalibrationConfig(**options)


@pytest.mark.parametrize(
    ("refusal", "opening"),
    [
        (DEFAULT_REFUSAL, "I'm sorry"),
        ("I cannot help. Ask someone else.", "I cannot help"),
        ("No way", "No way"),
        (", odd.", ", odd."),
    ],
)
def test_the_opening_is_the_refusal_up_to_its_first_comma_or_full_stop(
    refusal: str, opening: str
) -> None:
    assert refusal_opening(refusal) == opening


def test_only_the_opening_is_scored_unless_the_whole_sentence_is_asked_for(
    family: dict[str, Any],
) -> None:
    adapter, base, degraded = family["adapter"], family["base"], family["degraded"]
    tokens = {}
    scores = {}
    for span in ("opening", "whole"):
        result = calibrate(adapter, degraded, base, _config(refusal_span=span))
        record = result.adapter.metadata.recipe["calibration"]["refusal"]
        assert record["span"] == span
        tokens[span] = record["tokens"]
        scores[span] = result.as_is.score
    opening = base.tokenizer("I'm sorry", add_special_tokens=False)["input_ids"]
    assert tokens["opening"] == len(opening) < tokens["whole"]
    assert scores["opening"] != scores["whole"]


# ----- the rule ---------------------------------------------------------------------------------
def test_the_objective_is_zero_when_the_reference_is_restored() -> None:
    reference = RefusalScore(harmful=-2.0, benign=-4.0)
    assert objective(RefusalScore(-1.5, -4.5), reference) == 0.0  # at least as safe, no worse
    assert objective(RefusalScore(-2.5, -4.0), reference) == pytest.approx(-0.5)  # refuses less
    assert objective(RefusalScore(-2.0, -3.0), reference) == pytest.approx(-1.0)  # over-refuses
    assert objective(RefusalScore(-3.0, -3.5), reference) == pytest.approx(-1.5)


def test_the_smallest_multiplier_within_tolerance_of_the_best_is_chosen() -> None:
    def point(multiplier: float, value: float) -> GridPoint:
        return GridPoint(0, 1, (1.0, multiplier), RefusalScore(0.0, 0.0), value)

    points = [point(0.5, -0.3), point(1.0, -0.00005), point(2.0, 0.0), point(3.0, 0.0)]
    assert choose_multiplier(points, 1, tolerance=1e-4) == 1.0
    assert choose_multiplier(points, 1, tolerance=0.0) == 2.0
    with pytest.raises(ValueError, match="no grid points"):
        choose_multiplier([], 1, 1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shots": 1}, "at least 2 shots"),
        ({"grid": ()}, "positive, finite"),
        ({"grid": (1.0, -1.0)}, "positive, finite"),
        ({"grid": (1.0, 1.0)}, "repeats"),
        ({"split": "test"}, "unknown split"),
        ({"reference_mode": "aligned"}, "unknown reference mode"),
        ({"refusal": "  "}, "refusal text is empty"),
        ({"refusal_span": "first"}, "unknown refusal span"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


# ----- shots ------------------------------------------------------------------------------------
def test_shots_are_half_harmful_over_categories_half_benign_from_the_fit_split() -> None:
    harmful, benign = harmful_split("fit"), benign_split("fit")
    shots = select_shots(harmful, benign, list(CATEGORIES), 16, seed=0)
    bad, good = [s for s in shots if s.harmful], [s for s in shots if not s.harmful]
    assert len(bad) == len(good) == 8
    assert len({s.category for s in bad}) == 8  # one per category while categories last
    assert sum(s.edgy for s in good) == 4  # alternating edgy and plain
    fit_ids = {p.id for p in harmful} | {p.id for p in benign}
    held_out = {p.id for split in ("dev", "test") for p in harmful_split(split)}
    held_out |= {p.id for split in ("dev", "test") for p in benign_split(split)}
    assert {s.id for s in shots} <= fit_ids and not {s.id for s in shots} & held_out
    assert shots == select_shots(harmful, benign, list(CATEGORIES), 16, seed=0)
    assert shots != select_shots(harmful, benign, list(CATEGORIES), 16, seed=1)
    # Two categories, five harmful shots: round-robin, then round two.
    few = select_shots(harmful, benign, ["fraud", "drugs"], 9, seed=0)
    counts = Counter(s.category for s in few if s.harmful)
    assert set(counts) == {"fraud", "drugs"} and sorted(counts.values()) == [2, 3]
    short = select_shots(harmful, benign, list(CATEGORIES), 16, 0, lambda p: len(p) < 60)
    assert all(len(s.prompt) < 60 for s in short)
    with pytest.raises(ValueError, match="no harmful prompt"):
        select_shots(harmful, benign, ["fraud"], 4, 0, lambda _p: False)


# ----- replaying the layers below the varied one ------------------------------------------------
def test_a_replayed_prefix_gives_the_full_passes_logits(
    tiny_model: PreTrainedModel, random_adapter: Any
) -> None:
    layers = (1, 2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # one left-padded row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hooks = SteeringHooks(tiny_model, 4, layers)
    modules = list(decoder_layers(tiny_model, 4))
    first_layer_calls = []
    modules[0].register_forward_pre_hook(lambda *_: first_layer_calls.append(1))
    table = torch.randn(3, 2, 64, generator=generator)

    def logits(scale_top: float) -> torch.Tensor:
        steered = table.clone()
        steered[:, 1] *= scale_top
        with torch.no_grad(), hooks.steering(steered):
            out: torch.Tensor = tiny_model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).logits
        return out

    replay = PrefixReplay(tiny_model, 4)
    full = {scale: logits(scale) for scale in (1.0, 2.0, 0.5)}
    calls = len(first_layer_calls)
    with replay.run("batch", 2) as replayed:  # records layer 1's (steered) output
        assert not replayed
        assert torch.equal(logits(1.0), full[1.0])
    assert replay.recorded("batch") and len(first_layer_calls) == calls + 1
    for scale in (2.0, 0.5):
        with replay.run("batch", 2) as replayed:
            assert replayed
            assert torch.equal(logits(scale), full[scale])
    assert len(first_layer_calls) == calls + 1  # layers 0 and 1 did not run again
    with replay.run("deeper", 3, shallower=("batch", 2)) as replayed:
        assert not replayed and torch.equal(logits(2.0), full[2.0])
    assert len(first_layer_calls) == calls + 1
    assert list(decoder_layers(tiny_model, 4)) == modules  # the real layers are back
    assert torch.equal(logits(2.0), full[2.0])
    with pytest.raises(ValueError, match="depth 4 outside"):
        replay.run("x", 4).__enter__()
    hooks.remove()


# ----- calibration ------------------------------------------------------------------------------
def test_calibration_pushes_harder_on_the_degraded_fine_tune_and_keeps_the_vectors(
    family: dict[str, Any], tmp_path: Path
) -> None:
    adapter, base, degraded = family["adapter"], family["base"], family["degraded"]
    own = calibrate(adapter, base, base, _config())
    result = calibrate(adapter, degraded, base, _config())

    # On the model the adapter was made for, the adapter as is is already the reference.
    assert own.multipliers == {PLANTED_LAYER: 1.0} and own.calibrated.objective == 0.0
    # On the degraded fine-tune the same steering refuses less; calibration pushes harder.
    assert result.as_is.score.harmful < result.reference.harmful
    assert result.multipliers[PLANTED_LAYER] > 1.0
    assert result.calibrated.objective > result.as_is.objective

    calibrated = SafetyAdapter.load(result.adapter.save(tmp_path / "cal.safetensors"))
    calibrated.check_fits(degraded.family)
    factor = result.multipliers[PLANTED_LAYER]
    for category in adapter.categories:
        ours = calibrated.vectors[category][PLANTED_LAYER]
        theirs = adapter.vectors[category][PLANTED_LAYER]
        assert ours.numpy().tobytes() == theirs.numpy().tobytes()  # bit for bit
        assert calibrated.coefficients[category][PLANTED_LAYER] == STEERING_NORM * factor
    assert calibrated.payload_sha256 == adapter.payload_sha256
    assert calibrated.id != adapter.id  # its own name: the server holds both apart
    meta = calibrated.metadata
    assert meta.base_fingerprint == degraded.fingerprint != adapter.metadata.base_fingerprint
    assert meta.name.startswith("planted.cal.base+degraded.")
    assert meta.recipe["merge"] == "orthogonal"  # the source recipe stays
    record = meta.recipe["calibration"]
    assert record["source_adapter"]["id"] == adapter.id
    assert record["source_adapter"]["base_fingerprint"] == base.fingerprint
    assert record["model"]["fingerprint"] == degraded.fingerprint
    assert record["reference"]["is_adapter_base"] is True
    assert record["multipliers"] == {str(PLANTED_LAYER): factor}
    assert record["config"]["grid"] == list(GRID)
    assert (record["shots"]["count"], record["shots"]["harmful"]) == (8, 4)
    assert record["shots"]["split"]["name"] == "fit"
    assert len(record["grid_points"]) == len(GRID)
    assert record["scores"]["calibrated"]["objective"] == round(result.calibrated.objective, 6)
    assert record["steering"].startswith("always on") and "'orthogonal'" in record["steering"]


def gated(adapter: SafetyAdapter, direction: torch.Tensor) -> SafetyAdapter:
    """`adapter` with a gate reading `direction` at layer 0 (mean-pooled), threshold 0."""
    entries = {c: CategoryGate(bias=0.0, threshold=0.0, target_fpr=0.05) for c in CATEGORIES}
    metadata = replace(adapter.metadata, gate=GateSpec(0, "mean", entries))
    conditions = {c: direction.clone() for c in CATEGORIES}
    return SafetyAdapter(metadata, adapter.vectors, adapter.coefficients, conditions)


def test_the_gate_thresholds_follow_the_fine_tunes_shift(family: dict[str, Any]) -> None:
    base, degraded = family["base"], family["degraded"]
    direction = family["adapter"].vectors[next(iter(CATEGORIES))][PLANTED_LAYER]
    adapter = gated(family["adapter"], direction)

    shifted = calibrate(adapter, degraded, base, _config())
    kept = calibrate(adapter, degraded, base, _config(gate="keep"))
    own = calibrate(adapter, base, base, _config())

    assert shifted.gate_shift is not None and kept.gate_shift is None and own.gate_shift is None
    benign = [s.prompt for s in shifted.shots if not s.harmful]
    gate = PromptGate.from_adapter(adapter)
    expected = probe_scores(degraded, gate, benign, 8).mean(0) - probe_scores(
        base, gate, benign, 8
    ).mean(0)
    # The degraded LoRA moves every token against the direction the probe reads.
    assert float(expected[0]) < 0
    for index, category in enumerate(CATEGORIES):
        spec = shifted.adapter.metadata.gate
        assert spec is not None
        threshold = spec.categories[category].threshold
        assert threshold == pytest.approx(float(expected[index]), abs=1e-5)
        assert shifted.gate_shift.shifts[category] == pytest.approx(threshold)
        assert kept.adapter.metadata.gate == adapter.metadata.gate
        probe = shifted.adapter.conditions[category]
        assert probe.numpy().tobytes() == adapter.conditions[category].numpy().tobytes()
    moved = PromptGate.from_adapter(shifted.adapter).threshold
    assert torch.equal(shifted.gate_shift.applied(gate).threshold, moved)
    record = shifted.adapter.metadata.recipe["calibration"]["gate"]
    assert record["benign_shots"] == len(benign) == 4
    assert kept.adapter.metadata.recipe["calibration"]["gate"] == {"rule": "thresholds kept"}
    assert shifted.multipliers == kept.multipliers  # the shift does not touch the search


def test_calibration_is_deterministic_for_a_seed(family: dict[str, Any]) -> None:
    adapter, base, degraded = family["adapter"], family["base"], family["degraded"]
    first = calibrate(adapter, degraded, base, _config(seed=3))
    again = calibrate(adapter, degraded, base, _config(seed=3))
    other = calibrate(adapter, degraded, base, _config(seed=4))
    assert first.shots == again.shots and first.multipliers == again.multipliers
    assert first.points == again.points
    assert first.adapter.coefficients == again.adapter.coefficients
    assert first.adapter.id == again.adapter.id
    assert {s.id for s in first.shots} != {s.id for s in other.shots}


def test_every_layer_gets_its_own_multiplier(family: dict[str, Any], random_adapter: Any) -> None:
    base, degraded = family["base"], family["degraded"]
    adapter = random_adapter(base.family, categories=("violence", "fraud"), layers=(1, 2))
    result = calibrate(adapter, degraded, base, _config(grid=(0.5, 1.0, 2.0), sweeps=2))
    assert set(result.multipliers) == {1, 2}
    assert {p.layer for p in result.points} == {1, 2} and len(result.points) == 2 * 2 * 3
    for category in adapter.categories:
        for layer, factor in result.multipliers.items():
            expected = adapter.coefficients[category][layer] * factor
            assert result.adapter.coefficients[category][layer] == expected
            assert torch.equal(
                result.adapter.vectors[category][layer], adapter.vectors[category][layer]
            )


def test_a_calibrated_adapter_cannot_take_the_source_name(family: dict[str, Any]) -> None:
    adapter, degraded = family["adapter"], family["degraded"]
    with pytest.raises(ValueError, match="same id"):
        calibrated_adapter(adapter, degraded, {PLANTED_LAYER: 2.0}, {}, name="planted")
    with pytest.raises(ValueError, match=r"no multiplier for steering layers \[1\]"):
        calibrated_adapter(adapter, degraded, {2: 2.0}, {})
    named = calibrated_adapter(adapter, degraded, {PLANTED_LAYER: 2.0}, {}, name="mine")
    assert named.id.startswith("mine@")


def test_against_the_unsteered_reference_the_weakest_steering_wins(
    family: dict[str, Any],
) -> None:
    # Steered, the base refuses more than unsteered at any multiplier, and its benign shots too:
    # restoring the unsteered base means as little steering as the grid allows.
    base = family["base"]
    result = calibrate(family["adapter"], base, base, _config(reference_mode="plain"))
    assert result.multipliers == {PLANTED_LAYER: min(GRID)}
    record = result.adapter.metadata.recipe["calibration"]
    assert record["reference"]["mode"] == "plain"
    assert result.reference.harmful < result.as_is.score.harmful


def test_an_adapter_of_another_family_is_refused(
    family: dict[str, Any], random_adapter: Any
) -> None:
    qwen = random_adapter(ModelFamily("qwen2", 48, 3), layers=(1,))
    with pytest.raises(AdapterMismatch, match="architecture is 'qwen2' in the adapter"):
        calibrate(qwen, family["degraded"], family["base"], _config())
    bigger = random_adapter(ModelFamily("llama", 64, 6), layers=(1,))
    with pytest.raises(AdapterMismatch, match="num_layers is 6"):
        calibrate(bigger, family["degraded"], family["base"], _config())


def test_a_reference_that_tokenizes_differently_is_refused(family: dict[str, Any]) -> None:
    base = family["base"]
    other = tiny_tokenizer()
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="tokenize the shots differently"):
        calibrate(family["adapter"], family["degraded"], replace(base, tokenizer=other), _config())


# ----- command line -----------------------------------------------------------------------------
def test_cli_calibrate_writes_the_calibrated_adapter(
    family: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = family["tmp"] / "adapters" / "calibrated.safetensors"
    status = cli.main(
        [
            "calibrate",
            "--adapter", str(family["adapter_file"]),
            "--model", family["degraded_source"],
            "--shots", "6",
            "--grid", "0.5,1,2,3",
            "--out", str(out),
            "--threads", "1",
            "--quiet",
        ]
    )  # fmt: skip
    assert status == 0
    calibrated = SafetyAdapter.load(out)
    source = family["adapter"]
    assert calibrated.metadata.base_fingerprint == family["degraded"].fingerprint
    record = calibrated.metadata.recipe["calibration"]
    # The reference defaults to the model the adapter's recipe names: the base.
    assert record["reference"]["source"] == family["base_source"]
    assert record["reference"]["is_adapter_base"] is True
    assert record["shots"]["count"] == 6
    assert record["command"].startswith("safesteer calibrate --adapter ")
    assert "--grid 0.5,1,2,3" in record["command"] and record["threads"] == 1
    assert record["total_seconds"] >= record["load_seconds"] >= 0
    factor = record["multipliers"][str(PLANTED_LAYER)]
    assert factor > 1.0
    for category in source.categories:
        assert torch.equal(calibrated.vectors[category][1], source.vectors[category][1])
    printed = capsys.readouterr().out
    assert f"multipliers: layer 1 x{factor:g}" in printed
    assert "base+degraded calibrated" in printed and f"wrote {out}" in printed


def test_cli_calibrate_refuses_an_adapter_of_another_family(
    family: dict[str, Any], random_adapter: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = family["tmp"]
    other = random_adapter(ModelFamily("qwen2", 48, 3), layers=(1,)).save(tmp / "qwen.safetensors")
    flags = ["--model", family["degraded_source"], "--out", str(tmp / "x.safetensors")]
    assert cli.main(["calibrate", "--adapter", str(other), *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: qwen.safetensors cannot be calibrated for this model" in err
    assert "architecture is 'qwen2' in the adapter, the model needs 'llama'" in err
    assert "Traceback" not in err and not (tmp / "x.safetensors").exists()

    # An adapter that does not say which model it was made for needs --reference.
    bare = random_adapter(family["base"].family, layers=(1,)).save(tmp / "bare.safetensors")
    assert cli.main(["calibrate", "--adapter", str(bare), *flags, "--quiet"]) == 2
    assert "pass --reference" in capsys.readouterr().err
