"""Where a decode step's time goes on the packaged model, and what int8 weights would buy.

Prefills a batch of chat prompts, then times greedy decode steps of the bare model (no
engine, no steering) and profiles a few with `torch.profiler`, for the model as served
(fp32) and, for comparison, with PyTorch's dynamic int8 quantization of every `nn.Linear`
(`torch.ao.quantization.quantize_dynamic`, deprecated upstream but still shipped). It also
checks batch invariance: the first row's logits decoded inside the batch against the same
row decoded alone. Dynamic quantization takes one activation scale per tensor, that is per
batch, so a row's numbers depend on the other rows; the fp32 model's do not.

    .venv/bin/python bench/decode_profile.py [--batch 16] [--steps 30] [--rounds 3]

Prints one block per variant; measure on a quiet machine (see README "Findings").
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, PreTrainedModel

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.loading import LoadedModel, load_model
from safesteer.adapters.merging import MergingBasis, merge_scheme
from safesteer.adapters.table import SteeringBasis

PROMPT = "Write a long story about topic number {i} and its history."
BUILT_IN = Path(__file__).resolve().parents[1] / "adapters" / "smollm2-135m" / "safety.safetensors"


def int8_dynamic(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of `model` with every `nn.Linear` (the LM head too) in dynamic int8."""
    from torch.ao.quantization import quantize_dynamic

    quantized = copy.deepcopy(model)
    body, head = quantized.get_submodule("model"), quantized.get_submodule("lm_head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized.model = quantize_dynamic(body, {nn.Linear}, dtype=torch.qint8)  # type: ignore[no-untyped-call]
        wrapped = quantize_dynamic(nn.Sequential(head), {nn.Linear}, dtype=torch.qint8)  # type: ignore[no-untyped-call]
    quantized.lm_head = wrapped[0]
    return quantized


class Decoder:
    """Greedy decoding of one left-padded batch with a growing `DynamicCache`."""

    def __init__(self, model: PreTrainedModel, ids: list[list[int]], pad: int) -> None:
        self.model = model
        width = max(map(len, ids))
        self.input = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        lead = torch.tensor([width - len(x) for x in ids])
        self.mask = (torch.arange(width)[None] >= lead[:, None]).long()
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=model.config)
        logits = self._forward(self.input, positions)
        self.next = logits.argmax(-1)
        self.position = positions[:, -1] + 1

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    def step(self) -> torch.Tensor:
        rows = self.mask.shape[0]
        self.mask = torch.cat([self.mask, torch.ones(rows, 1, dtype=torch.long)], 1)
        logits = self._forward(self.next[:, None], self.position[:, None])
        self.next = logits.argmax(-1)
        self.position = self.position + 1
        return logits


def timed(fn: Callable[[], object], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def report(name: str, model: PreTrainedModel, ids: list[list[int]], pad: int, steps: int) -> None:
    with torch.inference_mode():
        batch = Decoder(model, ids, pad)
        for _ in range(5):
            batch.step()
        seconds = timed(batch.step, steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                batch.step()
        together = Decoder(model, ids, pad)
        alone = Decoder(model, ids[:1], pad)
        gaps = []
        for _ in range(8):
            gaps.append(float((together.step()[0] - alone.step()[0]).abs().max()))
    rows = len(ids)
    print(f"== {name}: batch {rows}")
    print(f"decode step {1000 * seconds:.1f} ms, {rows / seconds:.1f} tokens/s (bare model)")
    print(f"row 0 in the batch vs alone, max |logit gap| over 8 steps: {max(gaps):.3g}")
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]:
        share = 100 * event.self_cpu_time_total / total
        print(f"  {event.key:<52} {share:5.1f}% of self CPU, {event.count // 5:>4} calls/step")


def steering_overhead(
    loaded: LoadedModel, ids: list[list[int]], pad: int, steps: int, rounds: int
) -> None:
    """Decode tokens/s with every row steered over tokens/s unsteered, same hooks, ABBA."""
    adapter = SafetyAdapter.load(BUILT_IN)
    layers = tuple(range(loaded.family.num_layers))
    basis = MergingBasis.of(
        SteeringBasis.from_adapter(adapter, layers=layers), merge_scheme(None, adapter)
    )
    table = basis.table(basis.weights({})[None].expand(len(ids), -1))
    hooks = SteeringHooks(loaded.model, loaded.family.num_layers, layers)
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    try:
        with torch.inference_mode():
            for name in ["on", "off", "off", "on"] * rounds:
                with hooks.steering(table if name == "on" else None):
                    batch = Decoder(loaded.model, ids, pad)
                    seconds[name].append(timed(batch.step, steps))
    finally:
        hooks.remove()
    on, off = (sum(seconds[k]) / len(seconds[k]) for k in ("on", "off"))
    print(f"== steering overhead: {adapter.id}, {len(layers)} hooked layers, batch {len(ids)}")
    print(f"step with every row steered {1000 * on:.1f} ms, unsteered {1000 * off:.1f} ms")
    print(f"tokens/s steered / unsteered: {off / on:.3f} ({2 * rounds} runs of {steps} steps each)")
    spread = [f"{1000 * t:.0f}" for k in ("on", "off") for t in seconds[k]]
    print(f"per-run step ms (on..., off...): {' '.join(spread)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="rows [16]")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps [30]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default]")
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds of steering on/off [3]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m-instruct")
    tokenizer = loaded.tokenizer
    ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT.format(i=i)}], add_generation_prompt=True
        )["input_ids"]
        for i in range(args.batch)
    ]
    pad = tokenizer.pad_token_id or 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    report("fp32 (as served)", loaded.model, ids, pad, args.steps)
    report("dynamic int8 Linear (not served)", int8_dynamic(loaded.model), ids, pad, args.steps)
    steering_overhead(loaded, ids, pad, args.steps, args.rounds)


if __name__ == "__main__":
    main()
