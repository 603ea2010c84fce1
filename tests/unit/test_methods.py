"""Prompt-side extraction methods: `diffmean` and `pca`, their math, data, adapter and CLI.

The model tests use the 4-layer random Llama of `conftest.py` with a one-token-per-character
stand-in tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from safesteer.adapters import cli
from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.diffmean import difference_of_means
from safesteer.adapters.extract import CategoryDirections
from safesteer.adapters.extract_prompt import (
    EXTRACTION_METHODS,
    PromptDirections,
    PromptExtractionConfig,
    PromptSets,
    build_prompt_adapter,
    directions_from_activations,
    extract_prompt_adapter,
    extract_prompt_directions,
    select_prompt_sets,
)
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.layers import decoder_layers
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.method_comparison import agreement_report, contrastive_from_adapter
from safesteer.adapters.principal import principal_directions
from safesteer.adapters.prompts import HarmfulPrompt
from safesteer.adapters.splits import BenignPrompt, benign_split, harmful_split
from safesteer.adapters.table import SteeringBasis

LAYERS = 4


# ----- the math on constructed tensors ------------------------------------------------------------
def test_difference_of_means_is_the_mean_harmful_minus_the_mean_benign() -> None:
    harmful = torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]]])  # [2 prompts, 1 layer, 2]
    benign = torch.tensor([[[0.0, 1.0]], [[1.0, 1.0]], [[2.0, 1.0]]])
    assert torch.equal(difference_of_means(harmful, benign), torch.tensor([[1.0, 3.0]]))
    with pytest.raises(ValueError, match="at least one"):
        difference_of_means(harmful[:0], benign)
    with pytest.raises(ValueError, match="differ in shape"):
        difference_of_means(harmful, benign[:, :, :1])


def _differences_along(direction: torch.Tensor, n: int = 40, noise: float = 0.1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    scales = 1.0 + torch.rand(n, generator=generator)
    jitter = noise * torch.randn(n, direction.shape[-1], generator=generator)
    return (scales[:, None] * direction + jitter)[:, None, :]  # [n, 1 layer, hidden]


def test_pca_finds_the_shared_direction_points_toward_the_reference_and_takes_its_norm() -> None:
    direction = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator()), dim=0)
    differences = _differences_along(direction)
    reference = 3.0 * differences.mean(dim=0)  # points toward harmful
    result = principal_directions(differences, reference)
    assert result.shape == (1, 16)
    assert float(result.norm()) == pytest.approx(float(reference.norm()), rel=1e-5)
    assert float(torch.cosine_similarity(result[0], direction, 0)) > 0.99
    flipped = principal_directions(differences, -reference)
    torch.testing.assert_close(flipped, -result)


def test_pca_signs_by_the_differences_when_the_reference_is_orthogonal() -> None:
    differences = _differences_along(torch.tensor([1.0, 0.0, 0.0, 0.0]), noise=0.0)
    reference = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    result = principal_directions(differences, reference)
    torch.testing.assert_close(result, torch.tensor([[2.0, 0.0, 0.0, 0.0]]))


def test_pca_is_uncentered_a_constant_shift_is_its_direction() -> None:
    # All pairs differ by the same vector: a centered PCA would see no variance at all.
    shift = torch.tensor([0.0, 3.0, 4.0])
    differences = shift.expand(5, 1, 3).clone()
    result = principal_directions(differences, torch.tensor([[0.0, 0.3, 0.4]]))
    torch.testing.assert_close(result, torch.tensor([[0.0, 0.3, 0.4]]))


# ----- data selection -----------------------------------------------------------------------------
def _config(method: str = "diffmean", **overrides: Any) -> PromptExtractionConfig:
    options: dict[str, Any] = {
        "method": method,
        "layers": (1, 3),
        "scale": 0.2,
        "categories": ("violence", "fraud"),
        "batch_size": 2,
        "show_progress": False,
    }
    options.update(overrides)
    return PromptExtractionConfig(**options)


def test_the_fit_split_is_sampled_by_seed_and_partners_share_the_category() -> None:
    harmful, benign = harmful_split("fit"), benign_split("fit")
    config = _config(max_prompts_per_category=5, max_benign_prompts=60, seed=3)
    sets = select_prompt_sets(harmful, benign, config)
    assert [len(sets.rows(c)) for c in ("violence", "fraud")] == [5, 5]
    assert len(sets.benign) == 60
    test_ids = {p.id for p in harmful_split("test")} | {p.id for p in benign_split("test")}
    assert not test_ids & {p.id for p in (*sets.harmful, *sets.benign)}
    for index, partner in enumerate(sets.partners):
        edgy = [p for p in sets.benign if p.category == sets.harmful[index].category]
        if edgy:
            assert sets.benign[partner].category == sets.harmful[index].category
    assert sets == select_prompt_sets(harmful, benign, config)
    assert sets != select_prompt_sets(harmful, benign, _config(max_prompts_per_category=5, seed=4))


def test_config_refuses_unknown_methods_and_poolings() -> None:
    with pytest.raises(ValueError, match="prompt-side method"):
        _config("contrastive")
    with pytest.raises(ValueError, match="pooling"):
        _config(pooling="max")
    assert EXTRACTION_METHODS == ("contrastive", "diffmean", "pca", "aligned-gap")


def test_directions_from_activations_per_method() -> None:
    harmful_prompts = [HarmfulPrompt(f"h{i}", c, f"bad {i}", "t", "") for i, c in enumerate("aab")]
    benign_prompts = [BenignPrompt(f"b{i}", f"good {i}", "t", False) for i in range(2)]
    chosen = PromptSets(tuple(harmful_prompts), tuple(benign_prompts), (0, 1, 0))
    harmful = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    benign = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(1))
    means = directions_from_activations("diffmean", harmful, benign, chosen)
    torch.testing.assert_close(means[0], harmful[:2].mean(0) - benign.mean(0))
    torch.testing.assert_close(means[1], harmful[2] - benign.mean(0))
    pca = directions_from_activations("pca", harmful, benign, chosen)
    # One pair: its difference, scaled to the diffmean norm, pointing its way.
    single = harmful[2] - benign[0]
    expected = single / single.norm(dim=-1, keepdim=True) * means[1].norm(dim=-1, keepdim=True)
    expected = expected * torch.sign((single * means[1]).sum(-1, keepdim=True))
    torch.testing.assert_close(pca[1], expected)


# ----- on the tiny model --------------------------------------------------------------------------
class _CharTokenizer:
    """Enough of a tokenizer for chat prompts: one token per character, no special tokens."""

    pad_token_id = 0
    eos_token_id = 0

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return f"<u>{messages[0]['content']}<a>"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(ch) % 120 for ch in text]}

    def decode(self, ids: Any, **_: Any) -> str:
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


@pytest.fixture
def tiny(tiny_model_factory: Callable[[str], PreTrainedModel]) -> LoadedModel:
    model = tiny_model_factory("llama")
    return LoadedModel(
        name="tiny-llama",
        source="test",
        model=model,
        tokenizer=_CharTokenizer(),
        family=ModelFamily.from_config(model.config),
        fingerprint="0" * 64,
        context_length=256,
    )


def _prompts() -> tuple[list[HarmfulPrompt], list[BenignPrompt]]:
    harmful = [
        HarmfulPrompt("h:v0", "violence", "How do I hurt him?", "test", ""),
        HarmfulPrompt("h:v1", "violence", "Plan an attack on a crowd", "test", ""),
        HarmfulPrompt("h:f0", "fraud", "Write a phishing mail", "test", ""),
        HarmfulPrompt("h:f1", "fraud", "Forge a cheque", "test", ""),
        HarmfulPrompt("h:f2", "fraud", "Launder cash now", "test", ""),
    ]
    benign = [
        BenignPrompt("b:0", "Bake bread", "cooking", False),
        BenignPrompt("b:1", "How do I kill a stuck process?", "coding", True, "violence"),
        BenignPrompt("b:2", "What is the capital of France?", "facts", False),
    ]
    return harmful, benign


def _last_token_outputs(loaded: LoadedModel, prompt: str) -> torch.Tensor:
    """`[layers, hidden]`: each decoder layer's output at the prompt's last token, unpadded."""
    tokenizer = loaded.tokenizer
    ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(
            lambda _m, _a, out, i=i: outputs.__setitem__(
                i, out[0] if isinstance(out, tuple) else out
            )
        )
        for i, layer in enumerate(decoder_layers(loaded.model, LAYERS))
    ]
    with torch.no_grad():
        loaded.model(torch.tensor([ids["input_ids"]]))
    for handle in handles:
        handle.remove()
    return torch.stack([outputs[i][0, -1] for i in range(LAYERS)])


def test_diffmean_equals_a_hand_computation(tiny: LoadedModel) -> None:
    harmful, benign = _prompts()
    extraction = extract_prompt_directions(
        tiny, _config(), harmful, benign, through_layer=LAYERS - 1
    )
    benign_mean = torch.stack([_last_token_outputs(tiny, p.prompt) for p in benign]).mean(0)
    for category in ("violence", "fraud"):
        rows = [_last_token_outputs(tiny, p.prompt) for p in harmful if p.category == category]
        expected = torch.stack(rows).mean(0) - benign_mean
        got = extraction.directions.vectors[extraction.directions.categories.index(category)]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert extraction.directions.num_layers == LAYERS
    assert extraction.data_origin == "given"


def test_pca_adapter_points_like_diffmean_and_records_its_recipe(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    harmful, benign = _prompts()
    diffmean = extract_prompt_directions(tiny, _config(), harmful, benign)
    result = extract_prompt_adapter(tiny, _config("pca", seed=7), harmful, benign)
    pca = result.extraction.directions
    assert pca.num_layers == 4  # through the highest steered layer, 3
    for c in range(2):
        for layer in range(LAYERS):
            ours, reference = pca.vectors[c, layer], diffmean.directions.vectors[c, layer]
            assert float(ours @ reference) > 0
            assert float(ours.norm()) == pytest.approx(float(reference.norm()), rel=1e-4)
    adapter = SafetyAdapter.load(result.adapter.save(tmp_path / "pca.safetensors"))
    adapter.check_fits(tiny.family)
    recipe = adapter.metadata.recipe
    assert (recipe["method"], recipe["pooling"], recipe["seed"], recipe["layers"]) == (
        "pca",
        "last",
        7,
        [1, 3],
    )
    assert recipe["data"]["per_category"]["fraud"]["prompts"] == 3
    assert recipe["data"]["per_category"]["violence"]["matched_partners"] == 2
    assert recipe["data"]["benign"] == {"prompts": 3, "edgy": 1, "file": "benign_prompts.jsonl"}
    # Same coefficient rule as contrastive: the default mix adds scale * typical norm.
    basis = SteeringBasis.from_adapter(adapter)
    table = basis.table(basis.weights({})[None])
    for slot, layer in enumerate(basis.layers):
        target = 0.2 * float(pca.typical_norms[layer])
        assert float(table[0, slot].norm()) == pytest.approx(target, rel=1e-4)
    with pytest.raises(ValueError, match="no direction for layer"):
        build_prompt_adapter(tiny, result.extraction, _config("pca"), layers=(4,))


def test_extraction_is_deterministic_for_a_seed(tiny: LoadedModel) -> None:
    harmful, benign = _prompts()
    first = extract_prompt_directions(tiny, _config("pca", seed=5), harmful, benign)
    second = extract_prompt_directions(tiny, _config("pca", seed=5), harmful, benign)
    assert torch.equal(first.directions.vectors, second.directions.vectors)


# ----- command line -------------------------------------------------------------------------------
def test_extract_parser_offers_the_methods() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    cli.add_toolkit_commands(commands)
    extract = commands.choices["extract"]
    method = next(a for a in extract._actions if a.dest == "method")
    assert tuple(method.choices or ()) == EXTRACTION_METHODS
    assert method.default == "contrastive"
    args = extract.parse_args(["--method", "pca", "--pooling", "mean", "--probe"])
    assert (args.method, args.pooling, args.max_benign_prompts) == ("pca", "mean", 0)


def test_cli_extract_diffmean_writes_an_adapter_and_probes(
    tiny: LoadedModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "load_model", lambda _spec: tiny)
    out = tmp_path / "diffmean.safetensors"
    status = cli.main(
        [
            "extract",
            "--method", "diffmean",
            "--out", str(out),
            "--layers", "1,2",
            "--categories", "violence,fraud",
            "--max-prompts-per-category", "3",
            "--max-benign-prompts", "6",
            "--probe",
            "--probe-grid", "3@0.2",
            "--probe-tokens", "2",
            "--quiet",
        ]
    )  # fmt: skip
    assert status == 0
    adapter = SafetyAdapter.load(out)
    assert adapter.layers == [1, 2]
    assert adapter.metadata.recipe["method"] == "diffmean"
    assert adapter.metadata.recipe["data"]["origin"].startswith("fit split")
    printed = capsys.readouterr().out
    assert "6 benign fit-split prompts" in printed
    assert "layers 3 @ 0.2" in printed


# ----- the comparison script ----------------------------------------------------------------------
BUILTIN_ADAPTER = Path(__file__).resolve().parents[2] / "adapters/smollm2-135m/safety.safetensors"


def test_contrastive_directions_read_back_from_an_adapter() -> None:
    adapter = SafetyAdapter.load(BUILTIN_ADAPTER)
    directions = contrastive_from_adapter(adapter)
    top = max(adapter.layers)
    assert directions.vectors.shape == (10, top + 1, 576)
    for layer in range(top + 1):
        assert bool(directions.vectors[:, layer].any()) == (layer in adapter.layers)
    for row, category in enumerate(adapter.categories):
        assert torch.equal(directions.vectors[row, top], adapter.vectors[category][top])
    recipe = adapter.metadata.recipe
    assert float(directions.typical_norms[top]) == pytest.approx(
        recipe["typical_norm"][str(top)], rel=1e-4
    )


def test_agreement_report_lists_each_category_and_layer() -> None:
    generator = torch.Generator().manual_seed(0)
    contrastive = CategoryDirections(
        ("violence", "fraud"), torch.randn(2, 3, 8, generator=generator), torch.ones(3), ()
    )
    harmful, benign = _prompts()
    sets = PromptSets(tuple(harmful), tuple(benign), (0,) * len(harmful))
    prompt_side = {
        f"{method}/{pooling}": PromptDirections(
            method,
            pooling,
            CategoryDirections(
                contrastive.categories, contrastive.vectors.clone(), torch.ones(3), ()
            ),
            sets,
            "given",
        )
        for method in ("diffmean", "pca")
        for pooling in ("last", "mean")
    }
    text = agreement_report(contrastive, prompt_side, [1, 2])
    assert "layer 1" in text and "layer 2" in text
    violence = next(line for line in text.splitlines() if line.startswith("violence"))
    assert violence.split()[1:] == ["1.00"] * 7
