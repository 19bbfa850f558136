"""Load test of the steered OpenAI-compatible server on the embedded model: 1, 4 and 16 concurrent clients.

    python bench/server_load.py [--tokens 64] [--threads 1] [--device D] [--dtype T] [--out FILE.json]

Starts the server in-process on a loopback port (uvicorn in a thread, the shipped presets), then for each level runs
closed-loop clients (each sends its next request when the previous one returns) with mixed steering: none, each
shipped preset, and an inline config. Every request asks for ``--tokens`` greedy tokens. Reported per level:
completion-token throughput and its ratio to the 1-client (sequential) level, p50/p99 latency, errors, and the mean
batch size the engine ran. Levels run one after another in the same process, so the ratios are side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from servers.__main__ import load_served_model
from servers.app import create_app
from servers.settings import ServerSettings
from steerlib.devices import add_device_arguments, hardware_info
from steerlib.hf.loading import EMBEDDED_NAME

log = logging.getLogger("bench.server_load")
PRESETS = Path(__file__).resolve().parents[1] / "servers" / "presets"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your new garden.",
]
STEERINGS: list[Any] = [
    [],
    ["refusal_ablate"],
    ["refusal_add"],
    ["refusal_clamp"],
    {"interventions": [{"op": "add", "layer": 10, "vector": {"preset_vector": "refusal"}, "coefficient": 2.0}]},
]
LEVELS = "1:8,4:16,16:32"
"""clients:requests of each level; the first level is the sequential baseline."""


def _body(i: int, tokens: int) -> dict[str, Any]:
    return {
        "model": EMBEDDED_NAME,
        "max_tokens": tokens,
        "temperature": 0,
        "steering": STEERINGS[i % len(STEERINGS)],
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
    }


async def _level(url: str, clients: int, n_requests: int, tokens: int) -> dict[str, Any]:
    todo = list(range(n_requests))
    latencies: list[float] = []
    completion = 0
    errors = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal completion, errors
        while todo:
            i = todo.pop()
            start = time.perf_counter()
            try:
                r = await c.post("/v1/chat/completions", json=_body(i, tokens))
                r.raise_for_status()
                completion += int(r.json()["usage"]["completion_tokens"])
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as e:
                errors += 1
                log.warning("request %d failed: %s", i, e)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await asyncio.gather(*[client(c) for _ in range(clients)])
    wall = time.perf_counter() - start
    lat = sorted(latencies) or [float("nan")]
    return {
        "clients": clients,
        "requests": n_requests,
        "errors": errors,
        "wall_s": round(wall, 2),
        "completion_tokens": completion,
        "tokens_per_s": round(completion / wall, 2),
        "p50_latency_s": round(statistics.median(lat), 2),
        "p99_latency_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
    }


def _batch_stats(app: Any) -> tuple[float, float]:
    samples = {s.name: s.value for s in app.state.steerlib.metrics.batch_size.collect()[0].samples}
    return samples["steerlib_batch_size_sum"], samples["steerlib_batch_size_count"]


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    add_device_arguments(p)
    p.add_argument("--levels", default=LEVELS, help=f"clients:requests,... (default {LEVELS})")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "server_load.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    settings = ServerSettings(presets=PRESETS, max_batch=16, batch_wait_ms=20, device=args.device, dtype=args.dtype)
    model, tok, name = load_served_model(settings)  # as `python -m servers` loads it
    params = next(model.parameters())
    app = create_app(settings, model, tok, name)
    server, thread, url = _serve(app)
    results = []
    try:
        asyncio.run(_level(url, 1, 1, 8))  # warm-up
        for level in args.levels.split(","):
            clients, n = (int(x) for x in level.split(":"))
            before = _batch_stats(app)
            res = asyncio.run(_level(url, clients, n, args.tokens))
            after = _batch_stats(app)
            res["mean_batch_size"] = round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 2)
            results.append(res)
            log.info("%s", res)
    finally:
        server.should_exit = True
        thread.join(60)
    base = results[0]["tokens_per_s"]
    for r in results:
        r["throughput_vs_sequential"] = round(r["tokens_per_s"] / base, 2)
    report = {
        "model": EMBEDDED_NAME,
        "tokens_per_request": args.tokens,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
        "torch": torch.__version__,
        "dtype": str(params.dtype).removeprefix("torch."),
        "hardware": hardware_info(params.device),
        "levels": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
