"""Serving benchmark: safesteer's continuous batching against peers on the packaged model.

One run starts each server as a subprocess on a free 127.0.0.1 port, waits for it to be
healthy, warms it up with two requests, loads it with streaming chat completions of exactly
64 new tokens (forced length) at several concurrency levels, and stops it by PID. It prints a
table plus the ratios the engine issue targets, and writes everything as JSON (`--out`).

    .venv/bin/python bench/serving_bench.py --quick          # smoke run, safesteer only
    bench/setup_peers.sh                                     # once: builds the llama.cpp peers
    .venv/bin/python bench/serving_bench.py                  # full run, all peers

Peers: `naive` (bench/naive_server.py: HF generate under a lock), `llamacpp`
(llama-cpp-python's own server, from bench/.venv-peers) and `llama-server` (llama.cpp's C++
server with 16 parallel slots, from bench/.peers-build) and `transformers-serve` (`transformers
serve --continuous-batching` on the dequantized model folder, from the project venv).
Aggregate tokens/s of a level is the completion tokens of all its requests divided by the
level's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 64
PEERS = ("naive", "llamacpp", "llama-server", "transformers-serve")
PEERS_VENV_PYTHON = BENCH / ".venv-peers" / "bin" / "python"
LLAMA_SERVER = BENCH / ".peers-build" / "bin" / "llama-server"
BUILTIN_ADAPTER = ROOT / "adapters" / "smollm2-135m" / "safety.safetensors"
# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>): banned by `logit_bias` to
# force the length on llama-cpp-python, whose server has no `ignore_eos`. Its `min_tokens`
# covers only one EOS id, and in 0.3.36 sending it together with `logit_bias` drops both
# (`logits_processor = logits_processor.extend(...)` sets it to None in Llama._create_completion).
SMOLLM2_EOG_IDS = (0, 2)
PROMPTS = (
    "Explain in detail how a refrigerator keeps food cold.",
    "Write a long story about a lighthouse keeper and a storm.",
    "Describe the water cycle step by step for a school class.",
    "Give me a detailed plan for learning to play the guitar.",
    "What are the main causes of the French Revolution? Explain each.",
    "Write a travel guide for a weekend in Lisbon.",
    "Explain how vaccines train the immune system.",
    "Describe how to bake sourdough bread from scratch.",
    "Compare Python and Rust for writing command line tools.",
    "Explain the rules of chess to a beginner.",
    "Write a letter to a friend about your summer holidays.",
    "How does a bicycle stay upright while moving? Explain thoroughly.",
    "Describe the life cycle of a star.",
    "Give ten tips for writing clear technical documentation, with examples.",
    "Explain what a hash table is and how it handles collisions.",
    "Write a product description for a handmade wooden chair.",
)
TARGETS = {
    "steering_overhead": 0.97,
    "mixed_toggles": 0.95,
    "scaling_c16_over_single": 4.0,
    "vs_naive_c16": 4.0,
    "vs_llamacpp_c16": 1.0,
    "vs_llama_server_c16": 1.0,
    "vs_transformers_serve_c16": 1.0,
}

Payload = dict[str, Any]
PayloadFn = Callable[[int], Payload]


# ----- results ------------------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool
    tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    usage_reported: bool = False
    error: str = ""


@dataclass
class LevelResult:
    label: str
    concurrency: int
    requests: int
    errors: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    stream_tokens_per_s_p50: float
    tokens_estimated: bool
    first_error: str = ""


@dataclass
class ServerRun:
    name: str
    command: list[str]
    startup_s: float = 0.0
    peak_rss_mb: float = 0.0
    levels: list[LevelResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def level(self, label: str) -> LevelResult | None:
        return next((lv for lv in self.levels if lv.label == label), None)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(
    label: str, concurrency: int, results: list[RequestResult], wall_s: float
) -> LevelResult:
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    latencies = [r.latency_s for r in good]
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    streams = [
        (r.tokens - 1) / (r.latency_s - r.ttft_s)
        for r in good
        if r.ttft_s is not None and r.tokens > 1 and r.latency_s > r.ttft_s
    ]
    errors = [r.error for r in results if not r.ok]
    return LevelResult(
        label=label,
        concurrency=concurrency,
        requests=len(results),
        errors=len(errors),
        tokens=tokens,
        wall_s=round(wall_s, 3),
        tokens_per_s=round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        latency_p50_s=round(percentile(latencies, 50), 3),
        latency_p95_s=round(percentile(latencies, 95), 3),
        ttft_p50_s=round(percentile(ttfts, 50), 3),
        ttft_p95_s=round(percentile(ttfts, 95), 3),
        stream_tokens_per_s_p50=round(statistics.median(streams), 2) if streams else math.nan,
        tokens_estimated=any(not r.usage_reported for r in good),
        first_error=errors[0][:300] if errors else "",
    )


# ----- load generation ----------------------------------------------------------------------
def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or {}
    return str(delta.get("content") or "")


async def stream_request(
    client: httpx.AsyncClient, url: str, payload: Payload, timeout_s: float
) -> RequestResult:
    """One streaming chat completion: latency, time to first content, completion tokens."""
    start = time.perf_counter()
    ttft: float | None = None
    content_chunks, usage_tokens = 0, None
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                return RequestResult(False, error=f"HTTP {resp.status_code}: {body}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return RequestResult(False, error=f"error chunk: {chunk['error']}")
                if _chunk_text(chunk):
                    content_chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"]["completion_tokens"])
    except (httpx.HTTPError, TimeoutError, json.JSONDecodeError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    tokens = usage_tokens if usage_tokens is not None else content_chunks
    return RequestResult(True, tokens, latency, ttft, usage_tokens is not None)


async def run_level(
    base_url: str,
    payload_fn: PayloadFn,
    *,
    label: str,
    concurrency: int,
    requests: int,
    budget_s: float,
    request_timeout_s: float,
) -> LevelResult:
    """`requests` requests from `concurrency` workers; no new request after `budget_s`."""
    url = f"{base_url}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    results: list[RequestResult] = []
    counter = iter(range(requests))
    start = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        for index in counter:
            if time.perf_counter() - start > budget_s:
                return
            results.append(await stream_request(client, url, payload_fn(index), request_timeout_s))

    async with httpx.AsyncClient(limits=limits, timeout=request_timeout_s) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return summarize(label, concurrency, results, time.perf_counter() - start)


# ----- payloads -----------------------------------------------------------------------------
def messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]


def base_payload(index: int, tokens: int = NEW_TOKENS) -> Payload:
    return {
        "model": MODEL,
        "messages": messages(index),
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def forced_payload(server: str, tokens: int) -> PayloadFn:
    """The payload forcing exactly `tokens` new tokens, as each server understands it."""

    def payload(index: int) -> Payload:
        body = base_payload(index, tokens)
        if server == "llamacpp":
            body["logit_bias"] = {str(t): -100.0 for t in SMOLLM2_EOG_IDS}
        elif server == "transformers-serve":
            # No `ignore_eos` (422) and no working `logit_bias`: the long-answer prompts run
            # to the length on their own; levels under 64 tokens a request are flagged.
            body["model"] = str(model_folder())
        else:  # safesteer, naive and llama-server all take vLLM's `ignore_eos`
            body["ignore_eos"] = True
        return body

    return payload


def with_safety(mixes: Callable[[int], Payload], tokens: int) -> PayloadFn:
    def payload(index: int) -> Payload:
        return {**forced_payload("safesteer", tokens)(index), "safety": mixes(index)}

    return payload


def mix_for(index: int, categories: Sequence[str]) -> Payload:
    """A distinct, never-empty category mix per index (weights in 0..2)."""
    weights = {c: ((index + 3 * j) % 5) * 0.5 for j, c in enumerate(categories)}
    if not any(weights.values()):
        weights[categories[0]] = 1.0
    return {"mode": "always", "categories": weights}


# ----- server processes ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of `pid` from /proc, in MiB; 0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def rss_now_mb(pid: int) -> float:
    """Current RSS of `pid` and its children (psutil when available), in MiB."""
    try:
        import psutil
    except ImportError:
        return 0.0
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        total: int = sum(p.memory_info().rss for p in procs)
        return round(total / 2**20, 1)
    except psutil.Error:
        return 0.0


class ServerProcess:
    """A server subprocess on 127.0.0.1: start, wait for health, sample memory, stop by PID."""

    def __init__(self, name: str, command: list[str], health_path: str, log_dir: Path) -> None:
        self.name = name
        self.command = command
        self.health_path = health_path
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss_samples: list[float] = []

    def start(self, port: int, timeout_s: float) -> float:
        """Start and wait until healthy; returns the seconds it took."""
        start = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{port}{self.health_path}"
        while time.perf_counter() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout_s:.0f} s: {self.tail()}")

    def sample(self) -> None:
        if self.proc is not None:
            self.rss_samples.append(rss_now_mb(self.proc.pid))

    def peak_rss_mb(self) -> float:
        hwm = peak_rss_mb(self.proc.pid) if self.proc else 0.0
        return max([hwm, *self.rss_samples])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def sample_memory(server: ServerProcess, stop: asyncio.Event) -> None:
    while not stop.is_set():
        server.sample()
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)


def server_command(
    name: str, port: int, adapter: Path | None, threads: int, torch_threads: int | None
) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port)]
    torch_flags = ["--threads", str(torch_threads)] if torch_threads else []
    if name == "safesteer":
        extra = ["--adapter", str(adapter)] if adapter else []
        cli = Path(sys.executable).with_name("safesteer")
        return [str(cli), "serve", *common, "--log-level", "warning", *extra, *torch_flags]
    if name == "naive":
        return [sys.executable, str(BENCH / "naive_server.py"), *common, *torch_flags]
    if name == "transformers-serve":
        cli = Path(sys.executable).with_name("transformers")
        return [
            str(cli), "serve", str(model_folder()), *common, "--continuous-batching",
            "--dtype", "float32", "--device", "cpu", "--log-level", "warning",
        ]  # fmt: skip
    gguf = str(packaged_gguf_path())
    if name == "llamacpp":
        return [
            str(PEERS_VENV_PYTHON), "-m", "llama_cpp.server", "--model", gguf, *common,
            "--n_threads", str(threads), "--n_ctx", "2048", "--verbose", "False",
            "--interrupt_requests", "False",
        ]  # fmt: skip
    return [
        str(LLAMA_SERVER), "-m", gguf, *common, "-t", str(threads), "-np", "16",
        "-c", str(16 * 256), "--no-webui",
    ]  # fmt: skip


def missing_peer(name: str) -> Path | None:
    """The executable a peer needs when it is not built yet."""
    needs = {"llamacpp": PEERS_VENV_PYTHON, "llama-server": LLAMA_SERVER}.get(name)
    return needs if needs is not None and not needs.is_file() else None


HEALTH_PATHS = {
    "safesteer": "/health",
    "naive": "/health",
    "llamacpp": "/v1/models",
    "llama-server": "/health",
    "transformers-serve": "/health",
}


def model_folder() -> Path:
    """The packaged model's dequantized safetensors folder (what `transformers serve` reads)."""
    from safesteer.adapters.loading import dequantized_folder

    return dequantized_folder(MODEL)


def packaged_gguf_path() -> Path:
    from safesteer.adapters.loading import packaged_gguf

    return packaged_gguf(MODEL)


@contextmanager
def running_server(
    name: str, adapter: Path | None, args: argparse.Namespace, log_dir: Path
) -> Iterator[tuple[ServerProcess, str, float]]:
    port = free_port()
    server = ServerProcess(
        name,
        server_command(name, port, adapter, args.threads, args.torch_threads),
        HEALTH_PATHS[name],
        log_dir,
    )
    try:
        startup = server.start(port, args.startup_timeout)
        yield server, f"http://127.0.0.1:{port}", startup
    finally:
        server.stop()


# ----- measurement plans --------------------------------------------------------------------
def level_requests(concurrency: int, args: argparse.Namespace) -> int:
    fixed: int | None = args.requests_per_level
    if fixed:
        return max(fixed, concurrency)
    rounds: int = args.rounds
    return max(rounds * concurrency, 3)


async def measure(
    base_url: str, payload_fn: PayloadFn, label: str, concurrency: int, args: argparse.Namespace
) -> LevelResult:
    result = await run_level(
        base_url,
        payload_fn,
        label=label,
        concurrency=concurrency,
        requests=level_requests(concurrency, args),
        budget_s=args.level_budget,
        request_timeout_s=args.request_timeout,
    )
    print(
        f"  {label:<22} c={concurrency:<3} {result.requests:>3} req  "
        f"{result.tokens_per_s:8.1f} tok/s  p50 {result.latency_p50_s:6.2f} s  "
        f"ttft p50 {result.ttft_p50_s:6.2f} s  errors {result.errors}",
        flush=True,
    )
    if result.errors:
        print(f"    first error: {result.first_error}", flush=True)
    return result


async def warm_up(base_url: str, payload_fn: PayloadFn, timeout_s: float) -> None:
    url = f"{base_url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for index in range(2):
            result = await stream_request(client, url, payload_fn(index), timeout_s)
            if not result.ok:
                raise RuntimeError(f"warm-up request failed: {result.error}")


async def adapter_categories(base_url: str) -> list[str]:
    """The served adapter's categories, from the safety report of a tiny request."""
    body = {**base_payload(0), "max_tokens": 1, "stream": False}
    body.pop("stream_options")
    async with httpx.AsyncClient(timeout=120) as client:
        resp = await client.post(f"{base_url}/v1/chat/completions", json=body)
        resp.raise_for_status()
        return list(resp.json()["safety"]["categories"])


async def paired(
    base_url: str,
    plans: dict[str, PayloadFn],
    concurrency: int,
    args: argparse.Namespace,
) -> list[LevelResult]:
    """Run each plan `args.repeats` times, interleaved in alternating order to cancel drift."""
    results: list[LevelResult] = []
    names = list(plans)
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            results.append(await measure(base_url, plans[name], name, concurrency, args))
    return results


async def bench_safesteer(
    server: ServerProcess, base_url: str, run: ServerRun, args: argparse.Namespace
) -> None:
    tokens: int = args.new_tokens
    default = forced_payload("safesteer", tokens)
    await warm_up(base_url, default, args.request_timeout)
    for concurrency in args.concurrency:
        run.levels.append(await measure(base_url, default, f"c{concurrency}", concurrency, args))
        server.sample()
    categories = await adapter_categories(base_url)
    all_on = {"mode": "always", "categories": dict.fromkeys(categories, 1.0)}
    overhead = {
        "steer-off": with_safety(lambda _: {"mode": "off"}, tokens),
        "steer-all-on": with_safety(lambda _: all_on, tokens),
    }
    run.levels += await paired(base_url, overhead, 16, args)
    mixes = {
        "mix-identical": with_safety(lambda _: mix_for(0, categories), tokens),
        "mix-different": with_safety(lambda i: mix_for(i, categories), tokens),
    }
    run.levels += await paired(base_url, mixes, 16, args)
    run.notes.append(
        f"c<N> levels send no safety block (adapter defaults); {len(categories)} categories"
    )


async def bench_peer(base_url: str, run: ServerRun, args: argparse.Namespace) -> None:
    tokens: int = args.new_tokens
    payload = forced_payload(run.name, tokens)
    await warm_up(base_url, payload, args.request_timeout)
    for concurrency in args.peer_concurrency:
        run.levels.append(await measure(base_url, payload, f"c{concurrency}", concurrency, args))


def note_short_levels(run: ServerRun, tokens: int) -> None:
    """Flag levels whose requests got fewer tokens than forced (forcing did not hold)."""
    short = [lv.label for lv in run.levels if lv.tokens < (lv.requests - lv.errors) * tokens]
    if short:
        run.notes.append(f"fewer than {tokens} tokens per request at {short}")


async def bench_server(
    name: str, adapter: Path | None, args: argparse.Namespace, log_dir: Path
) -> ServerRun:
    print(f"== {name}  (load average {os.getloadavg()[0]:.2f})", flush=True)
    run = ServerRun(name, [])
    missing = missing_peer(name)
    if missing:
        run.error = f"{missing} is missing: run bench/setup_peers.sh"
        print(f"  skipped: {run.error}", flush=True)
        return run
    try:
        with running_server(name, adapter, args, log_dir) as (server, base_url, startup):
            run.command, run.startup_s = server.command, round(startup, 1)
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_memory(server, stop))
            try:
                if name == "safesteer":
                    await bench_safesteer(server, base_url, run, args)
                else:
                    await bench_peer(base_url, run, args)
                note_short_levels(run, args.new_tokens)
            finally:
                stop.set()
                await sampler
                run.peak_rss_mb = server.peak_rss_mb()
                if any(lv.errors for lv in run.levels):
                    run.notes.append(f"server log tail: {server.tail()}")
    except (RuntimeError, OSError, httpx.HTTPError, KeyError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"  {name} failed: {run.error}", flush=True)
    return run


# ----- ratios, table, facts -----------------------------------------------------------------
def pooled_tps(run: ServerRun, label: str) -> float | None:
    """Tokens over wall time of every level named `label` (repeats pooled)."""
    levels = [lv for lv in run.levels if lv.label == label]
    wall = sum(lv.wall_s for lv in levels)
    return sum(lv.tokens for lv in levels) / wall if wall else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def compute_ratios(runs: dict[str, ServerRun]) -> dict[str, dict[str, Any]]:
    ours = runs.get("safesteer")
    if ours is None:
        return {}
    c16, single = pooled_tps(ours, "c16"), pooled_tps(ours, "c1")
    values = {
        "steering_overhead": ratio(pooled_tps(ours, "steer-all-on"), pooled_tps(ours, "steer-off")),
        "mixed_toggles": ratio(
            pooled_tps(ours, "mix-different"), pooled_tps(ours, "mix-identical")
        ),
        "scaling_c16_over_single": ratio(c16, single),
    }
    for peer, key in (
        ("naive", "naive"),
        ("llamacpp", "llamacpp"),
        ("llama-server", "llama_server"),
        ("transformers-serve", "transformers_serve"),
    ):
        if peer in runs:
            values[f"vs_{key}_c16"] = ratio(c16, pooled_tps(runs[peer], "c16"))
    return {
        name: {
            "value": value,
            "target": TARGETS[name],
            "met": None if value is None else value >= TARGETS[name],
        }
        for name, value in values.items()
    }


def format_table(runs: dict[str, ServerRun]) -> str:
    header = (
        f"{'server':<13} {'level':<14} {'conc':>4} {'req':>4} {'err':>3} {'tok/s':>8} "
        f"{'lat p50':>8} {'lat p95':>8} {'ttft p50':>8} {'ttft p95':>8} {'stream':>7}"
    )
    lines = [header, "-" * len(header)]
    for run in runs.values():
        if run.error:
            lines.append(f"{run.name:<13} FAILED: {run.error.splitlines()[0][:80]}")
        for lv in run.levels:
            est = "*" if lv.tokens_estimated else " "
            lines.append(
                f"{run.name:<13} {lv.label:<14} {lv.concurrency:>4} {lv.requests:>4} "
                f"{lv.errors:>3} {lv.tokens_per_s:>7.1f}{est} {lv.latency_p50_s:>7.2f}s "
                f"{lv.latency_p95_s:>7.2f}s {lv.ttft_p50_s:>7.2f}s {lv.ttft_p95_s:>7.2f}s "
                f"{lv.stream_tokens_per_s_p50:>7.1f}"
            )
    lines.append("")
    lines.append(
        "peak RSS: " + ", ".join(f"{r.name} {r.peak_rss_mb:.0f} MiB" for r in runs.values())
    )
    lines.append(
        "stream = median per-request decode tok/s after the first token; * = tokens counted"
    )
    lines.append("from stream chunks (server sent no usage)")
    return "\n".join(lines)


def format_ratios(ratios: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, item in ratios.items():
        value = "n/a" if item["value"] is None else f"{item['value']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "n/a"}[item["met"]]
        lines.append(f"{name:<26} {value:>8}   target >= {item['target']:<5} {verdict}")
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _command_output(command: list[str], timeout_s: float = 30) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout + done.stderr).strip()[-300:] or None


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_facts(peers: Sequence[str]) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": _version("transformers"),
        "safesteer": _version("safesteer"),
        "git_commit": _command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_command_output(["git", "-C", str(ROOT), "status", "--porcelain"])),
    }
    if "llamacpp" in peers:
        facts["llama_cpp_python"] = _command_output(
            [str(PEERS_VENV_PYTHON), "-c", "import llama_cpp; print(llama_cpp.__version__)"]
        )
    if "llama-server" in peers:
        facts["llama_server"] = _command_output([str(LLAMA_SERVER), "--version"])
    return facts


# ----- adapter ------------------------------------------------------------------------------
def resolve_adapter(args: argparse.Namespace, work_dir: Path) -> tuple[Path | None, str]:
    """The adapter to serve and how it was chosen (a random one when the built-in is absent)."""
    if args.adapter:
        return args.adapter, f"given: {args.adapter}"
    if BUILTIN_ADAPTER.is_file():
        return None, f"built-in: {BUILTIN_ADAPTER.relative_to(ROOT)}"
    path = work_dir / "random-adapter.safetensors"
    make_random_adapter(path)
    return path, "random (built-in adapter missing): 10 categories, layers 12, 15, 18"


def make_random_adapter(path: Path, layers: Sequence[int] = (12, 15, 18)) -> None:
    import torch

    from safesteer.adapters.adapter import AdapterMetadata, CategorySpec, SafetyAdapter
    from safesteer.adapters.categories import CATEGORIES
    from safesteer.adapters.loading import load_model

    family = load_model(MODEL).family
    generator = torch.Generator().manual_seed(0)
    vectors = {
        c: {la: torch.randn(family.hidden_size, generator=generator) for la in layers}
        for c in CATEGORIES
    }
    coefficients = {c: dict.fromkeys(layers, 1.0) for c in CATEGORIES}
    specs = {c: CategorySpec(desc, 1.0) for c, desc in CATEGORIES.items()}
    metadata_ = AdapterMetadata.for_family("bench-random", family, specs)
    SafetyAdapter(metadata_, vectors, coefficients).save(path)


# ----- command line -------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, comma separated")
    return values


def peer_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip() and v.strip() != "none"]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Serving benchmark of safesteer against peers (64 forced tokens per request).",
        epilog="Peers need bench/setup_peers.sh (llamacpp, llama-server). "
        "--quick: concurrency 1,4,16, 2 rounds, 1 repeat, no peers unless --peers is given.",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke run: fewer levels and requests, no peers")
    add("--concurrency", type=int_list, help="safesteer levels [1,4,8,16,32; quick 1,4,16]")
    add("--peer-concurrency", type=int_list, default=[1, 16], help="peer levels [1,16]")
    add(
        "--peers", type=peer_list, help=f"comma list of {','.join(PEERS)} or none [all; quick none]"
    )
    add("--rounds", type=int, help="requests per level = rounds x concurrency [3; quick 2]")
    add("--requests-per-level", type=int, help="fixed requests per level (overrides --rounds)")
    add("--repeats", type=int, help="interleaved repeats of the paired c16 runs [2; quick 1]")
    add("--new-tokens", type=int, default=NEW_TOKENS, help="forced completion length [64]")
    add("--adapter", type=Path, help="adapter file for safesteer [built-in, else a random one]")
    add("--threads", type=int, default=os.cpu_count() or 1, help="threads for llama.cpp peers")
    add("--torch-threads", type=int, help="--threads for safesteer and naive [torch default]")
    add("--level-budget", type=float, default=120.0, help="seconds after which a level stops")
    add("--request-timeout", type=float, default=300.0, help="seconds per request")
    add("--startup-timeout", type=float, default=300.0, help="seconds to wait for health")
    add("--out", type=Path, default=BENCH / "results" / "latest.json", help="JSON results path")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    quick = args.quick
    args.concurrency = args.concurrency or ([1, 4, 16] if quick else [1, 4, 8, 16, 32])
    if 1 not in args.concurrency or 16 not in args.concurrency:
        args.concurrency = sorted({1, 16, *args.concurrency})  # the ratios need c1 and c16
    if 16 not in args.peer_concurrency:
        args.peer_concurrency = sorted({16, *args.peer_concurrency})
    args.peers = args.peers if args.peers is not None else ([] if quick else list(PEERS))
    args.rounds = args.rounds or (2 if quick else 3)
    args.repeats = args.repeats or (1 if quick else 2)
    return args


async def run_all(
    args: argparse.Namespace, adapter: Path | None, log_dir: Path
) -> dict[str, ServerRun]:
    runs: dict[str, ServerRun] = {}
    for name in ["safesteer", *args.peers]:
        runs[name] = await bench_server(name, adapter, args, log_dir)
        if runs[name].error:
            print(f"  log tail of {name}:\n{runs[name].error[-800:]}", flush=True)
    return runs


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the `running_server` blocks: servers get stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="safesteer-bench-") as tmp:
        work_dir = Path(tmp)
        adapter, adapter_note = resolve_adapter(args, work_dir)
        print(f"adapter: {adapter_note}", flush=True)
        runs = asyncio.run(run_all(args, adapter, work_dir))
    ratios = compute_ratios(runs)
    table, ratio_text = format_table(runs), format_ratios(ratios)
    print("\n" + table + "\n\n" + ratio_text)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "mode": "quick" if args.quick else "full",
        "new_tokens": args.new_tokens,
        "adapter": adapter_note,
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "machine": machine_facts(args.peers),
        "servers": {name: asdict(run) for name, run in runs.items()},
        "ratios": ratios,
        "table": table.splitlines(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(finite(result), indent=2, allow_nan=False) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(not run.error for run in runs.values()) else 1


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
