"""Extract a safety adapter: per harm category, the response-side contrastive direction.

Method `contrastive` (CAA-style, on responses): for each harmful prompt of a category, build the
chat prompt with the tokenizer's template, teacher-force (a) a refusal and (b) a complying
answer, and average each decoder layer's output over the response tokens. The category's
vector at layer i is the mean over its prompts of (refusal mean - compliance mean), in the
adapter's layer convention "decoder-output-0" (what decoder layer i outputs).

Refusals are the data set's reference refusals where it has them, else sentences built from
the project's templates (`data/refusal_templates.json`), picked by seed and prompt id.
Compliance answers are the data set's complying answers where it has them, else the model's
own greedy answer. Both responses are cut to the same number of tokens.

Coefficients make the default mix (every category at weight 1) add a vector of norm
`scale * typical_norm[l]` at each chosen layer l, where `typical_norm[l]` is the mean norm of
layer l's output over the teacher-forced response tokens.

`probe_adapter` greedily answers the project's probe prompts with and without steering and
counts refusals with a keyword judge: a quick check, not an evaluation.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from safesteer.adapters.adapter import AdapterMetadata, CategorySpec, SafetyAdapter
from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.judge import is_refusal
from safesteer.adapters.layers import decoder_layers
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.padding import left_pad
from safesteer.adapters.prompts import (
    SOURCE_LICENSES,
    HarmfulPrompt,
    ProbePrompts,
    RefusalTemplates,
    load_harmful_prompts,
    load_refusal_templates,
)
from safesteer.adapters.table import SteeringBasis

METHODS: tuple[str, ...] = ("contrastive",)
# Called once per batch with the batch's prompts (rows in that order); returns the context in
# which the batch is generated.
Steering = Callable[[Sequence[str]], AbstractContextManager[None]]


@dataclass(frozen=True)
class ExtractionConfig:
    """What to extract and how; every field ends up in the adapter's recipe."""

    layers: tuple[int, ...]
    scale: float
    seed: int = 0
    method: str = "contrastive"
    categories: tuple[str, ...] = tuple(CATEGORIES)
    max_prompts_per_category: int | None = 24
    max_response_tokens: int = 32
    compliance_tokens: int = 40
    batch_size: int = 16
    name: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if not self.layers:
            raise ValueError("choose at least one layer")
        if self.scale <= 0:
            raise ValueError("scale must be positive")
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown or not self.categories:
            raise ValueError(f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
        if self.max_response_tokens < 1 or self.compliance_tokens < 1 or self.batch_size < 1:
            raise ValueError("token counts and batch size must be positive")


@dataclass(frozen=True)
class ContrastPair:
    """A harmful prompt with the refusal and the compliance that are teacher-forced on it."""

    prompt: HarmfulPrompt
    refusal: str
    compliance: str
    refusal_origin: str  # "reference" or "template"
    compliance_origin: str  # "reference" or "generated"


@dataclass(frozen=True)
class CategoryDirections:
    """Mean refusal-minus-compliance layer outputs per category, at layers 0 .. n-1."""

    categories: tuple[str, ...]
    vectors: torch.Tensor  # [categories, layers, hidden]
    typical_norms: torch.Tensor  # [layers]
    pairs: tuple[ContrastPair, ...]
    dropped: Mapping[str, int] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """How many layers (from layer 0) the directions cover."""
        return int(self.vectors.shape[1])

    def vector(self, category: str, layer: int) -> torch.Tensor:
        return self.vectors[self.categories.index(category), layer]


@dataclass(frozen=True)
class ExtractionResult:
    """The adapter, the directions it was built from, and the wall time of the extraction."""

    adapter: SafetyAdapter
    directions: CategoryDirections
    seconds: float


# ----- prompt selection and responses ------------------------------------------------------
def select_prompts(
    prompts: Sequence[HarmfulPrompt],
    categories: Sequence[str],
    max_per_category: int | None,
    seed: int,
) -> list[HarmfulPrompt]:
    """Up to `max_per_category` prompts of each category, deterministic for a seed.

    Prompts with a reference compliance come first, then those with a reference refusal, each
    group in a seeded random order, so a cap keeps the best-documented pairs.
    """
    rng = random.Random(seed)
    selected: list[HarmfulPrompt] = []
    for category in categories:
        pool = [p for p in prompts if p.category == category]
        keys = {p.id: rng.random() for p in pool}
        pool.sort(key=lambda p: (p.compliance is None, p.refusal is None, keys[p.id]))
        selected.extend(pool if max_per_category is None else pool[:max_per_category])
    return selected


def template_refusal(prompt: HarmfulPrompt, templates: RefusalTemplates, seed: int) -> str:
    """A refusal built from the project's templates, the same for a given seed and prompt."""
    rng = random.Random(f"{seed}:{prompt.id}")
    opener = rng.choice(templates.openers)
    reason = rng.choice(templates.reasons[prompt.category])
    closer = rng.choice(templates.closers)
    return f"{opener} {reason} {closer}"


def is_repetitive(text: str, min_words: int = 12, max_repeat_share: float = 0.5) -> bool:
    """Crude degeneration check: more than half of a long answer's words are repeats."""
    words = text.lower().split()
    if len(words) < min_words:
        return False
    return 1 - len(set(words)) / len(words) > max_repeat_share


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a one-turn chat prompt, ending where the assistant's answer starts."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def _batches(count: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


@torch.inference_mode()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    steering: Steering | None = None,
    desc: str = "generating",
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding, in the prompts' order.

    `steering(batch_prompts)`, when given, returns the context in which that batch is generated.
    """
    encoded = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: dict[int, str] = {}
    pad = _pad_id(tokenizer)
    for batch in tqdm(_batches(len(order), batch_size), desc=desc, disable=not show_progress):
        indices = [order[i] for i in batch]
        input_ids, attention = left_pad([encoded[i] for i in indices], pad)
        width = input_ids.shape[1]
        batch_prompts = [prompts[i] for i in indices]
        context = steering(batch_prompts) if steering is not None else nullcontext()
        with context:
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for row, index in enumerate(indices):
            new_tokens = output[row, width:]
            answers[index] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return [answers[i] for i in range(len(prompts))]


def build_contrast_pairs(
    loaded: LoadedModel, prompts: Sequence[HarmfulPrompt], config: ExtractionConfig
) -> tuple[list[ContrastPair], dict[str, int]]:
    """Refusal and compliance for each prompt; generates the missing compliance answers.

    Returns the pairs and the number of prompts dropped per reason (a generated answer that is
    empty or is itself a refusal gives no contrast).
    """
    templates = load_refusal_templates()
    missing = [p for p in prompts if p.compliance is None]
    generated = generate_responses(
        loaded.model,
        loaded.tokenizer,
        [p.prompt for p in missing],
        max_new_tokens=config.compliance_tokens,
        batch_size=config.batch_size,
        desc="compliance answers",
        show_progress=config.show_progress,
    )
    own_answers = dict(zip((p.id for p in missing), generated, strict=True))
    pairs: list[ContrastPair] = []
    dropped = {"empty_generated_answer": 0, "generated_answer_refuses": 0}
    for prompt in prompts:
        compliance = prompt.compliance or own_answers[prompt.id]
        if prompt.compliance is None and not compliance:
            dropped["empty_generated_answer"] += 1
            continue
        if prompt.compliance is None and is_refusal(compliance):
            dropped["generated_answer_refuses"] += 1
            continue
        pairs.append(
            ContrastPair(
                prompt=prompt,
                refusal=prompt.refusal or template_refusal(prompt, templates, config.seed),
                compliance=compliance,
                refusal_origin="reference" if prompt.refusal else "template",
                compliance_origin="reference" if prompt.compliance else "generated",
            )
        )
    return pairs, dropped


# ----- teacher forcing ------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the last recording hook: the layers above it are not needed."""


class _ResponseMeanRecorder:
    """Forward hooks that reduce decoder layers' outputs over the masked positions.

    Records layers `0 .. len(layers) - 1`; the hook on the last one stops the forward pass.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.mask: torch.Tensor | None = None  # [rows, positions], 1.0 on response tokens
        self.means: list[torch.Tensor] = [torch.empty(0)] * len(layers)
        self.norms: list[torch.Tensor] = [torch.empty(0)] * len(layers)
        self._last = len(layers) - 1
        self._handles = [
            module.register_forward_hook(self._make_hook(index))
            for index, module in enumerate(layers)
        ]

    def _make_hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            assert self.mask is not None
            hidden = (output[0] if isinstance(output, tuple) else output).float()
            counts = self.mask.sum(dim=1)
            self.means[index] = (hidden * self.mask[..., None]).sum(dim=1) / counts[:, None]
            self.norms[index] = (hidden.norm(dim=-1) * self.mask).sum(dim=1) / counts
            if index == self._last:
                raise _StopForward

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def _recording(
    model: nn.Module, num_layers: int, through_layer: int
) -> Iterator[_ResponseMeanRecorder]:
    modules = decoder_layers(model, num_layers)
    recorder = _ResponseMeanRecorder([modules[i] for i in range(through_layer + 1)])
    try:
        yield recorder
    finally:
        recorder.remove()


@torch.inference_mode()
def response_activation_means(
    loaded: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_response_tokens: int,
    batch_size: int,
    through_layer: int | None = None,
    desc: str = "teacher forcing",
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-force each response after its chat prompt; average layer outputs over it.

    Returns `means [n, layers, hidden]`, each decoder layer's output averaged over the
    response tokens (the first `max_response_tokens`), and `norms [n, layers]`, the mean
    per-token norm of those outputs, for layers `0 .. through_layer` (default: all; the
    forward pass stops there). Batches are right-padded, so positions are exact.

    Raises:
        ValueError: a response has no tokens, or `through_layer` is not a layer.
    """
    tokenizer, model_layers = loaded.tokenizer, loaded.family.num_layers
    last = model_layers - 1 if through_layer is None else through_layer
    if not 0 <= last < model_layers:
        raise ValueError(f"through_layer {through_layer} outside 0..{model_layers - 1}")
    num_layers = last + 1
    sequences: list[tuple[list[int], int]] = []
    for prompt, response in zip(prompts, responses, strict=True):
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        response_ids = list(response_ids)[:max_response_tokens]
        if not response_ids:
            raise ValueError(f"empty response for prompt {prompt[:60]!r}")
        sequences.append((chat_prompt_ids(tokenizer, prompt) + response_ids, len(response_ids)))
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    hidden = loaded.family.hidden_size
    means = torch.zeros(len(sequences), num_layers, hidden)
    norms = torch.zeros(len(sequences), num_layers)
    backbone = getattr(loaded.model, "base_model", loaded.model)
    pad = _pad_id(tokenizer)
    with _recording(loaded.model, model_layers, last) as recorder:
        for batch in tqdm(_batches(len(order), batch_size), desc=desc, disable=not show_progress):
            indices = [order[i] for i in batch]
            width = max(len(sequences[i][0]) for i in indices)
            input_ids = torch.full((len(indices), width), pad, dtype=torch.long)
            attention = torch.zeros((len(indices), width), dtype=torch.long)
            response_mask = torch.zeros((len(indices), width))
            for row, index in enumerate(indices):
                ids, response_length = sequences[index]
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                response_mask[row, len(ids) - response_length : len(ids)] = 1.0
            recorder.mask = response_mask
            with suppress(_StopForward):
                backbone(input_ids=input_ids, attention_mask=attention, use_cache=False)
            rows = torch.tensor(indices)
            means[rows] = torch.stack(recorder.means, dim=1)
            norms[rows] = torch.stack(recorder.norms, dim=1)
    return means, norms


def contrastive_directions(
    loaded: LoadedModel,
    pairs: Sequence[ContrastPair],
    config: ExtractionConfig,
    through_layer: int | None = None,
) -> CategoryDirections:
    """Per category and layer: mean over its pairs of (refusal mean - compliance mean).

    Layers `0 .. through_layer` (default: all) are computed.

    Raises:
        ValueError: a category of `config` has no pair.
    """
    prompts = [pair.prompt.prompt for pair in pairs]
    options: dict[str, Any] = {
        "max_response_tokens": config.max_response_tokens,
        "batch_size": config.batch_size,
        "through_layer": through_layer,
        "show_progress": config.show_progress,
    }
    refusal, refusal_norms = response_activation_means(
        loaded, prompts, [p.refusal for p in pairs], desc="refusals", **options
    )
    compliance, compliance_norms = response_activation_means(
        loaded, prompts, [p.compliance for p in pairs], desc="compliance", **options
    )
    differences = refusal - compliance
    vectors = []
    for category in config.categories:
        rows = [i for i, pair in enumerate(pairs) if pair.prompt.category == category]
        if not rows:
            raise ValueError(f"no contrast pairs for category {category!r}")
        vectors.append(differences[rows].mean(dim=0))
    typical = torch.cat([refusal_norms, compliance_norms]).mean(dim=0)
    return CategoryDirections(tuple(config.categories), torch.stack(vectors), typical, tuple(pairs))


# ----- coefficients and the adapter -------------------------------------------------------------
def mix_norm_ratio(directions: CategoryDirections, layer: int) -> float:
    """Norm of the sum of the categories' unit vectors at `layer` (1 .. number of categories)."""
    vectors = directions.vectors[:, layer]
    units = vectors / vectors.norm(dim=-1, keepdim=True)
    return float(units.sum(dim=0).norm())


def layer_coefficients(
    directions: CategoryDirections, layers: Sequence[int], scale: float
) -> dict[str, dict[int, float]]:
    """Coefficients under which the default mix adds `scale * typical_norm[l]` at layer l.

    Every category gets the same norm of `coefficient * vector` at a layer; the shared norm is
    chosen so that the sum over all categories (weight 1 each) has the target norm.

    Raises:
        ValueError: a vector is zero, so no coefficient can scale it.
    """
    coefficients: dict[str, dict[int, float]] = {c: {} for c in directions.categories}
    for layer in layers:
        per_category_norm = (
            scale * float(directions.typical_norms[layer]) / mix_norm_ratio(directions, layer)
        )
        for category in directions.categories:
            length = float(directions.vector(category, layer).norm())
            if length == 0.0:
                raise ValueError(f"zero vector for {category} at layer {layer}")
            coefficients[category][layer] = per_category_norm / length
    return coefficients


def scaled_vectors(
    directions: CategoryDirections, layers: Sequence[int], scale: float
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, torch.Tensor]]]:
    """`(coefficients, vectors)` of every category at `layers`: `layer_coefficients` and a copy
    of each direction there.

    Raises:
        ValueError: a layer has no direction, or a direction is zero.
    """
    available = directions.num_layers
    for layer in layers:
        if not 0 <= layer < available:
            raise ValueError(f"no direction for layer {layer}: extracted layers 0..{available - 1}")
    vectors = {
        category: {layer: directions.vector(category, layer).clone() for layer in layers}
        for category in directions.categories
    }
    return layer_coefficients(directions, layers, scale), vectors


def norm_recipe(directions: CategoryDirections, layers: Sequence[int]) -> dict[str, Any]:
    """The recipe entries every extraction path records about the residual norms."""
    return {
        "typical_norm": {str(la): round(float(directions.typical_norms[la]), 3) for la in layers},
        "mix_norm_ratio": {str(la): round(mix_norm_ratio(directions, la), 4) for la in layers},
        "typical_norm_from_layer_0": [round(float(n), 2) for n in directions.typical_norms],
    }


def category_adapter(
    name: str,
    model: LoadedModel,
    vectors: dict[str, dict[int, torch.Tensor]],
    coefficients: dict[str, dict[int, float]],
    recipe: dict[str, Any],
) -> SafetyAdapter:
    """An adapter for `model` (its family and fingerprint) with every category at weight 1."""
    specs = {c: CategorySpec(description=CATEGORIES[c], default_weight=1.0) for c in vectors}
    metadata = AdapterMetadata.for_family(
        name, model.family, specs, base_fingerprint=model.fingerprint, recipe=recipe
    )
    return SafetyAdapter(metadata, vectors, coefficients)


def package_version() -> str:
    """The installed safesteer version, recorded in recipes ("unknown" when not installed)."""
    try:
        return version("safesteer")
    except PackageNotFoundError:
        return "unknown"


def _data_recipe(directions: CategoryDirections) -> dict[str, Any]:
    per_category: dict[str, dict[str, Any]] = {}
    for category in directions.categories:
        pairs = [p for p in directions.pairs if p.prompt.category == category]
        by_source: dict[str, int] = {}
        for pair in pairs:
            by_source[pair.prompt.source] = by_source.get(pair.prompt.source, 0) + 1
        per_category[category] = {
            "prompts": len(pairs),
            "by_source": by_source,
            "refusal": _origins(p.refusal_origin for p in pairs),
            "compliance": _origins(p.compliance_origin for p in pairs),
        }
    used = sorted({pair.prompt.source for pair in directions.pairs})
    return {
        "sources": {source: SOURCE_LICENSES.get(source, "not vendored") for source in used},
        "per_category": per_category,
        "dropped": dict(directions.dropped),
        "mapping": "safesteer/adapters/data/category_map.json",
        "refusal_templates": "safesteer/adapters/data/refusal_templates.json",
    }


def _origins(origins: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for origin in origins:
        counts[origin] = counts.get(origin, 0) + 1
    return counts


def build_adapter(
    loaded: LoadedModel,
    directions: CategoryDirections,
    config: ExtractionConfig,
    layers: Sequence[int] | None = None,
    scale: float | None = None,
) -> SafetyAdapter:
    """The adapter for `layers` at `scale` (default: the config's) from extracted directions."""
    layers = tuple(sorted(layers if layers is not None else config.layers))
    scale = scale if scale is not None else config.scale
    coefficients, vectors = scaled_vectors(directions, layers, scale)
    recipe: dict[str, Any] = {
        "method": config.method,
        "description": (
            "per category: mean over its harmful prompts of (decoder-layer output averaged over "
            "a teacher-forced refusal) - (the same over a teacher-forced compliance)"
        ),
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            "family_alias": loaded.family.alias,
        },
        "layers": list(layers),
        "scale": scale,
        "seed": config.seed,
        "max_prompts_per_category": config.max_prompts_per_category,
        "max_response_tokens": config.max_response_tokens,
        "compliance_tokens": config.compliance_tokens,
        "chat_template": "tokenizer's own, add_generation_prompt=True, one user turn",
        "coefficient_rule": (
            "coef[c][l] = scale * typical_norm[l] / (mix_norm_ratio[l] * |vector[c][l]|): "
            "the default mix (all categories at weight 1) adds scale * typical_norm[l]"
        ),
        **norm_recipe(directions, layers),
        "data": _data_recipe(directions),
        "safesteer_version": package_version(),
    }
    name = config.name or f"{loaded.family.alias}-safety"
    return category_adapter(name, loaded, vectors, coefficients, recipe)


def extract_directions(
    loaded: LoadedModel,
    config: ExtractionConfig,
    prompts: Sequence[HarmfulPrompt] | None = None,
    through_layer: int | None = None,
) -> CategoryDirections:
    """Select prompts, build refusal/compliance pairs, and teacher-force them.

    Directions cover layers `0 .. through_layer`; the default is the config's highest layer
    (the layers above it cost time and are not needed).
    """
    torch.manual_seed(config.seed)
    pool = prompts if prompts is not None else load_harmful_prompts()
    selected = select_prompts(pool, config.categories, config.max_prompts_per_category, config.seed)
    pairs, dropped = build_contrast_pairs(loaded, selected, config)
    last = max(config.layers) if through_layer is None else through_layer
    directions = contrastive_directions(loaded, pairs, config, through_layer=last)
    return CategoryDirections(
        directions.categories,
        directions.vectors,
        directions.typical_norms,
        directions.pairs,
        dropped,
    )


def extract_adapter(
    loaded: LoadedModel,
    config: ExtractionConfig,
    prompts: Sequence[HarmfulPrompt] | None = None,
) -> ExtractionResult:
    """Extract directions from the vendored prompts (or `prompts`) and build the adapter."""
    started = time.perf_counter()
    directions = extract_directions(loaded, config, prompts)
    adapter = build_adapter(loaded, directions, config)
    return ExtractionResult(adapter, directions, time.perf_counter() - started)


# ----- probe ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeReport:
    """Keyword-judged answers to the probe prompts under one steering setting."""

    label: str
    harmful_answers: tuple[str, ...]
    benign_answers: tuple[str, ...]

    @property
    def harmful_refused(self) -> int:
        return sum(map(is_refusal, self.harmful_answers))

    @property
    def benign_refused(self) -> int:
        return sum(map(is_refusal, self.benign_answers))

    @property
    def benign_repetitive(self) -> int:
        return sum(map(is_repetitive, self.benign_answers))

    def summary(self) -> str:
        return (
            f"{self.label:<28} harmful refused {self.harmful_refused}/{len(self.harmful_answers)}"
            f"   benign refused {self.benign_refused}/{len(self.benign_answers)}"
            f"   benign repetitive {self.benign_repetitive}/{len(self.benign_answers)}"
        )


def _default_mix_steering(loaded: LoadedModel, adapter: SafetyAdapter) -> tuple[Steering, Any]:
    basis = SteeringBasis.from_adapter(adapter)
    hooks = SteeringHooks(loaded.model, loaded.family.num_layers, basis.layers)
    weights = basis.weights({})

    def steering(batch: Sequence[str]) -> AbstractContextManager[None]:
        return hooks.steering(basis.table(weights.expand(len(batch), -1)))

    return steering, hooks


def probe_adapter(
    loaded: LoadedModel,
    adapter: SafetyAdapter | None,
    probe: ProbePrompts,
    *,
    label: str,
    max_new_tokens: int = 48,
    batch_size: int = 12,
    show_progress: bool = True,
) -> ProbeReport:
    """Greedy answers to the probe prompts with the adapter's default mix (None: unsteered)."""
    steering: Steering | None = None
    hooks: SteeringHooks | None = None
    if adapter is not None:
        steering, hooks = _default_mix_steering(loaded, adapter)
    try:
        answers = generate_responses(
            loaded.model,
            loaded.tokenizer,
            [*probe.harmful, *probe.benign],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            steering=steering,
            desc=f"probe {label}",
            show_progress=show_progress,
        )
    finally:
        if hooks is not None:
            hooks.remove()
    split = len(probe.harmful)
    return ProbeReport(label, tuple(answers[:split]), tuple(answers[split:]))
