"""Adapter hot-swap benchmark: activation latency while the server is under load.

Starts `safesteer serve` on the packaged model with a temporary adapter folder holding the
built-in adapter and a variant of it (the built-in scaled by 0.5), loads the variant through the
admin API, keeps `--concurrency` streaming chat requests running, and meanwhile activates the
two adapters in turn `--swaps` times. It prints the activation latency (p50 / p99 / max, the
admin call's round trip) and how many load requests failed (the target is zero), and checks
that every completed request reports one of the two adapters.

    .venv/bin/python bench/swap_bench.py                # 40 swaps under 16 streams
    .venv/bin/python bench/swap_bench.py --swaps 10 --concurrency 4    # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from serving_bench import BUILTIN_ADAPTER, PROMPTS, ServerProcess, free_port, percentile

from safesteer.adapters.adapter import SafetyAdapter

TARGET_P99_MS = 100.0
MIN_REQUESTS_PER_WORKER = 2
STAGGER_S = 0.4
FAMILY = "smollm2-135m"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=40, help="activations to time")
    parser.add_argument("--interval", type=float, default=0.75, help="seconds between swaps")
    parser.add_argument("--concurrency", type=int, default=16, help="streams kept running")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per load request")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


class Load:
    """Worker threads sending streaming chat requests until stopped."""

    def __init__(self, url: str, workers: int, tokens: int) -> None:
        self.url = url
        self.tokens = tokens
        self.stop = threading.Event()
        self.completed = 0
        self.failed: list[str] = []
        self.adapters: set[str] = set()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)
        ]

    def _one(self, client: httpx.Client, index: int) -> None:
        body = {
            "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "max_tokens": self.tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        adapter: str | None = None
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"status {response.status_code}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk: dict[str, Any] = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"]))
                if chunk.get("safety"):
                    adapter = chunk["safety"]["adapter"]
        with self.lock:
            self.completed += 1
            if adapter:
                self.adapters.add(adapter)

    def _work(self, worker: int) -> None:
        # Every worker sends at least two requests, so some are admitted during the swaps
        # (not only before them) however slow the machine is.
        time.sleep(worker * STAGGER_S)  # spread admissions over time, not one wave
        with httpx.Client(base_url=self.url, timeout=120) as client:
            index, sent = worker, 0
            while not self.stop.is_set() or sent < MIN_REQUESTS_PER_WORKER:
                sent += 1
                try:
                    self._one(client, index)
                except (httpx.HTTPError, RuntimeError) as exc:
                    with self.lock:
                        self.failed.append(repr(exc))
                index += len(self.threads)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="safesteer-swap-") as tmp:
        folder = Path(tmp)
        builtin = SafetyAdapter.load(BUILTIN_ADAPTER)
        builtin.save(folder / "adapters" / "builtin" / "safety.safetensors")
        (0.5 * builtin).save(folder / "adapters" / "variant" / "safety.safetensors")
        port = free_port()
        cli = Path(sys.executable).with_name("safesteer")
        command = [
            str(cli), "serve", "--port", str(port), "--log-level", "warning",
            "--adapter-dir", str(folder / "adapters"), "--state-dir", str(folder / "state"),
        ]  # fmt: skip
        server = ServerProcess("safesteer", command, "/ready", folder)
        url = f"http://127.0.0.1:{port}"
        try:
            startup = server.start(port, args.startup_timeout)
            print(f"server ready in {startup:.0f} s", file=sys.stderr)
            with httpx.Client(base_url=url, timeout=60) as admin:
                variant = admin.post(
                    "/admin/adapters/load", json={"path": "variant/safety.safetensors"}
                ).json()["id"]
                ids = [builtin.id, variant]
                latencies: list[float] = []
                with Load(url, args.concurrency, args.tokens) as load:
                    time.sleep(3)  # let the batch fill
                    for i in range(args.swaps):
                        start = time.perf_counter()
                        response = admin.post(
                            f"/admin/families/{FAMILY}/activate",
                            json={"adapter": ids[(i + 1) % 2]},
                        )
                        latencies.append((time.perf_counter() - start) * 1000)
                        if response.status_code != 200:
                            raise RuntimeError(f"activation failed: {response.text}")
                        time.sleep(args.interval)
                    rows = admin.get("/metrics").text
        finally:
            server.stop()
    results = {
        "swaps": len(latencies),
        "concurrency": args.concurrency,
        "swap_ms_p50": round(statistics.median(latencies), 2),
        "swap_ms_p99": round(percentile(latencies, 99), 2),
        "swap_ms_max": round(max(latencies), 2),
        "target_p99_ms": TARGET_P99_MS,
        "requests_completed": load.completed,
        "requests_failed": len(load.failed),
        "adapters_seen": sorted(load.adapters),
        "metrics_swaps": next(
            (line.split()[-1] for line in rows.splitlines() if "adapter_swaps_total{" in line),
            None,
        ),
    }
    print(
        f"swaps {results['swaps']} under {args.concurrency} streams: activation "
        f"p50 {results['swap_ms_p50']} ms, p99 {results['swap_ms_p99']} ms "
        f"(target < {TARGET_P99_MS:g}), max {results['swap_ms_max']} ms\n"
        f"load requests: {load.completed} completed, {len(load.failed)} failed; "
        f"adapters seen: {len(load.adapters)}"
    )
    for failure in load.failed[:5]:
        print(f"  failure: {failure}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    ok = (
        not load.failed
        and results["swap_ms_p99"] < TARGET_P99_MS
        and set(load.adapters) == set(ids)  # requests ran under both adapters
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
