"""Load test of the steered OpenAI-compatible server on the embedded model: 1, 4 and 16 concurrent clients.

    python bench/server_load.py [--engine hf|vllm|both] [--tokens 64] [--threads 1] [--device D] [--dtype T]
        [--vllm-args JSON] [--out FILE.json]

``--engine both`` (where vLLM is installed: its venv, ``steerlib/vllm/install.sh``) runs the same levels on the
``hf`` engine, then on ``vllm``, and reports each level's tokens/s ratio vllm / hf. Before the levels, every distinct
(prompt, steering) request runs once alone; each level counts the answers that differ from that request's answer
alone (``differs_from_alone``: with greedy decoding, a steering that leaked into a neighbour shows there).

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
COMBOS = len(PROMPTS) * len(STEERINGS)  # coprime lengths: request i is combination i % COMBOS
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


async def _level(
    url: str, clients: int, n_requests: int, tokens: int, alone: dict[int, str] | None = None
) -> dict[str, Any]:
    todo = list(range(n_requests))
    latencies: list[float] = []
    completion = 0
    errors = 0
    texts: dict[int, str] = {}

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal completion, errors
        while todo:
            i = todo.pop()
            start = time.perf_counter()
            try:
                r = await c.post("/v1/chat/completions", json=_body(i, tokens))
                r.raise_for_status()
                completion += int(r.json()["usage"]["completion_tokens"])
                texts[i % COMBOS] = str(r.json()["choices"][0]["message"]["content"])
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as e:
                errors += 1
                log.warning("request %d failed: %s", i, e)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await asyncio.gather(*[client(c) for _ in range(clients)])
    wall = time.perf_counter() - start
    lat = sorted(latencies) or [float("nan")]
    if alone is not None:
        alone.update(texts)
    return {
        "clients": clients,
        "requests": n_requests,
        "errors": errors,
        "texts": texts,
        "wall_s": round(wall, 2),
        "completion_tokens": completion,
        "tokens_per_s": round(completion / wall, 2),
        "p50_latency_s": round(statistics.median(lat), 2),
        "p99_latency_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
    }


def _batch_stats(app: Any, engine: str) -> tuple[float, float]:
    """(rows, batches) the hf engine has run so far; vLLM's continuous batching has no batches to count."""
    if engine != "hf":
        return 0.0, 0.0
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


def _run_engine(engine: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], Any]:
    """The levels on one engine, each with its answers checked against the same requests run alone."""
    extra = {"engine": engine} | ({"vllm_args": json.loads(args.vllm_args)} if engine == "vllm" else {})
    device = {"device": args.device} if engine == "hf" else {}
    settings = ServerSettings(presets=PRESETS, max_batch=16, batch_wait_ms=20, dtype=args.dtype, **device, **extra)
    model, tok, name = load_served_model(settings)  # as `python -m servers` loads it
    params = next(model.parameters())
    app = create_app(settings, model, tok, name)
    if engine == "vllm":
        log.info("vllm runs in %s", app.state.steerlib.engine.launch.dtype)
    server, thread, url = _serve(app)
    results = []
    alone: dict[int, str] = {}
    try:
        asyncio.run(_level(url, 1, COMBOS, args.tokens, alone))  # warm-up, and every request's answer alone
        for level in args.levels.split(","):
            clients, n = (int(x) for x in level.split(":"))
            before = _batch_stats(app, engine)
            res = asyncio.run(_level(url, clients, n, args.tokens))
            after = _batch_stats(app, engine)
            if engine == "hf":
                res["mean_batch_size"] = round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 2)
            texts = res.pop("texts")
            res["differs_from_alone"] = sum(texts[k] != alone[k] for k in texts)
            results.append(res)
            log.info("%s %s", engine, res)
    finally:
        server.should_exit = True
        thread.join(60)
    base = results[0]["tokens_per_s"]
    for r in results:
        r["throughput_vs_sequential"] = round(r["tokens_per_s"] / base, 2)
    return results, params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("hf", "vllm", "both"), default="hf")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the hf engine")
    add_device_arguments(p)
    p.add_argument("--vllm-args", default="{}", help="vLLM engine arguments (JSON), as the server's --vllm-args")
    p.add_argument("--levels", default=LEVELS, help=f"clients:requests,... (default {LEVELS})")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "server_load.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engines = ("hf", "vllm") if args.engine == "both" else (args.engine,)
    runs = {engine: _run_engine(engine, args) for engine in engines}
    params = runs[engines[0]][1]
    device = (
        params.device if params.device.type != "meta" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    report: dict[str, Any] = {
        "model": EMBEDDED_NAME,
        "tokens_per_request": args.tokens,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "torch": torch.__version__,
        "dtype": str(params.dtype).removeprefix("torch."),
        "hardware": hardware_info(device),
    }
    if len(engines) == 1:
        report["engine"] = engines[0]
        report["levels"] = runs[engines[0]][0]
    else:
        report["vllm_args"] = json.loads(args.vllm_args)
        report["note"] = "both engines run the model in the dtype above (--dtype; auto resolves the same on both)"
        report["engines"] = {e: r[0] for e, r in runs.items()}
        report["vllm_over_hf_tokens_per_s"] = {
            str(h["clients"]): round(v["tokens_per_s"] / h["tokens_per_s"], 2)
            for h, v in zip(runs["hf"][0], runs["vllm"][0], strict=True)
        }
        log.info("vllm / hf tokens/s by clients: %s", report["vllm_over_hf_tokens_per_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
