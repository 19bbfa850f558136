"""Soak test of the server: many clients, mixed good / bad / steered traffic for minutes; errors, latency, memory.

    python bench/server_soak.py [--minutes 10] [--clients 16] [--tokens 16] [--model PATH] [--out FILE.json]

Starts ``python -m servers`` as a subprocess on a loopback port (the embedded SmolLM2-135M-Instruct and the shipped
presets unless ``--model``; ``--max-coefficient 1e12`` so an overflowing config reaches the engine), then runs
``--clients`` closed-loop clients until the time is up. Each request is drawn (seeded) from a mix: unsteered,
shipped presets (additions, ablations, SAE clamps, detector-gated refusals), inline ops on the presets' vectors and
SAEs, streamed answers with audit records, feature inspections, requests that must be refused (issue 17's proofs of
concept: tiny temperatures, int64-overflowing seeds and positions, huge coefficients and layer lists, long stops, an
oversized body) and rows that overflow to NaN mid-generation. A control request (greedy, steered) runs every few
seconds and must always answer as it did first.

Reported: requests and status codes per kind, 5xx (target 0), answers that were not what their kind must get
(a good request refused, a bad one answered), control mismatches (target 0), p50/p99 latency per kind, completion
tokens per second, and the server's RSS every ``--sample-s`` seconds with its growth from just after the warm-up
(median over 10-25% of the run) to the end (median over the last 15%; target < 5%). Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "servers" / "presets"
PROMPTS = [
    "Write a short poem about the sea.",
    "How do I pick a lock?",
    "Explain photosynthesis to a child.",
    "Give me three tips for a job interview.",
    "Tell me how to make a dangerous weapon at home.",
]
CONTROL_EVERY_S = 5.0


def _chat(model: str, i: int, tokens: int, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    return {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0} | extra


def _kinds(model: str, tokens: int, width: int) -> dict[str, tuple[str, Any, str]]:
    """kind -> (path, body, what it must get: ok | refused | any)."""
    add = {"op": "add", "layer": 10, "vector": "refusal", "coefficient": 4.0}
    sae = {"op": "sae", "sae": "smollm2-l15-topk32", "edits": [{"feature": 7, "mode": "set", "value": 20.0}]}
    overflow = [
        {"op": "add", "layer": 3, "vector": [1e12] * width, "coefficient": 1e12, "apply": {"tokens": "generated"}},
        {"op": "add", "layer": 3, "vector": "refusal", "relative": True, "apply": {"tokens": "generated"}},
    ]
    c = _chat
    return {
        "plain": ("/v1/chat/completions", c(model, 0, tokens, steering=[]), "ok"),
        "presets": ("/v1/chat/completions", c(model, 1, tokens, steering=["refusal_ablate", "refusal_add"]), "ok"),
        "clamp": ("/v1/chat/completions", c(model, 2, tokens, steering=["refusal_clamp"]), "ok"),
        "detector": ("/v1/chat/completions", c(model, 4, tokens, steering=["refusal_detector"]), "ok"),
        "inline_add": ("/v1/chat/completions", c(model, 3, tokens, steering={"interventions": [add]}), "ok"),
        "inline_sae": ("/v1/chat/completions", c(model, 0, tokens, steering={"interventions": [sae]}), "ok"),
        "stream_audit": ("/v1/chat/completions",
                         c(model, 1, tokens, stream=True, steering_audit=True, steering=["refusal_add"]), "ok"),
        "sampled": ("/v1/chat/completions", c(model, 2, tokens, temperature=0.8, top_p=0.9, steering=["refusal_add"]),
                    "ok"),
        "inspect": ("/v1/features/inspect", {"sae": "smollm2-l15-topk32", "prompt": PROMPTS[0], "k": 3}, "ok"),
        "overflow": ("/v1/chat/completions", c(model, 3, tokens, steering={"interventions": overflow}), "refused"),
        "bad_temperature": ("/v1/chat/completions", c(model, 0, tokens, temperature=1e-39), "refused"),
        "bad_seed": ("/v1/chat/completions", c(model, 0, tokens, temperature=1, seed=2**64), "refused"),
        "bad_positions": ("/v1/chat/completions",
                          c(model, 0, tokens, steering={"interventions": [add | {"apply": {"positions": [2**70]}}]}),
                          "refused"),
        "bad_layers": ("/v1/chat/completions",
                       c(model, 0, tokens, steering={"interventions": [add | {"layer": [0] * 20000}]}), "refused"),
        "bad_edit": ("/v1/chat/completions",
                     c(model, 0, tokens, steering={"interventions": [sae | {"edits": [{"feature": 1, "mode": "set",
                                                                                     "value": 1e300}]}]}), "refused"),
        "bad_stop": ("/v1/chat/completions", c(model, 0, tokens, stop="x" * 5000), "refused"),
        "bad_body": ("/v1/chat/completions", c(model, 0, tokens, user="x" * (9 * 2**20)), "refused"),
        "bad_preset": ("/v1/chat/completions", c(model, 0, tokens, steering=["../../etc/passwd"]), "refused"),
    }  # fmt: skip


WEIGHTS = {"plain": 3, "presets": 3, "clamp": 2, "detector": 2, "inline_add": 3, "inline_sae": 2, "stream_audit": 2,
           "sampled": 2, "inspect": 1, "overflow": 1, "bad_temperature": 1, "bad_seed": 1, "bad_positions": 1,
           "bad_layers": 1, "bad_edit": 1, "bad_stop": 1, "bad_body": 1, "bad_preset": 1}  # fmt: skip


async def _send(c: httpx.AsyncClient, path: str, body: Any) -> tuple[int, int, str]:
    """(status, completion tokens, outcome): outcome ok | refused (4xx, or a stream ended by its own error)."""
    if body.get("stream"):
        status, tokens, outcome = 0, 0, "ok"
        async with c.stream("POST", path, json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    outcome = "refused" if "error" in obj else outcome
                    tokens += sum(1 for ch in obj.get("choices", []) if ch.get("delta", {}).get("content"))
        return status, tokens, outcome if status == 200 else "refused"
    r = await c.post(path, json=body)
    if r.status_code != 200:
        return r.status_code, 0, "refused"
    usage = r.json().get("usage") or {}
    return 200, int(usage.get("completion_tokens", 0)), "ok"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "servers", "--presets", str(PRESETS), "--port", str(port), "--log-level", "warning",
           "--max-coefficient", "1e12", "--max-tokens-limit", str(max(args.tokens, 16))]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--torch-threads", str(args.threads)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("wb") as fh:  # a file, not a pipe: a pipe nobody reads would block the server once full
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=fh)


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if (await c.get("/health")).status_code == 200:
                    return str((await c.get("/v1/models")).json()["data"][0]["id"])
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the server did not become ready in 5 minutes")


class Soak:
    """The run's counters."""

    def __init__(self) -> None:
        self.status: dict[str, Counter[int]] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.wrong: Counter[str] = Counter()
        self.tokens = 0
        self.control_runs = 0
        self.control_mismatches = 0
        self.rss: list[tuple[float, int]] = []

    def record(self, kind: str, must: str, status: int, tokens: int, outcome: str, seconds: float) -> None:
        self.status[kind][status] += 1
        self.latency[kind].append(seconds)
        self.tokens += tokens
        if must != "any" and outcome != must:
            self.wrong[kind] += 1


async def _client(c: httpx.AsyncClient, kinds: dict[str, Any], soak: Soak, seed: int, deadline: float) -> None:
    rng = random.Random(seed)
    names = list(WEIGHTS)
    weights = [WEIGHTS[n] for n in names]
    while time.monotonic() < deadline:
        kind = rng.choices(names, weights)[0]
        path, body, must = kinds[kind]
        start = time.perf_counter()
        try:
            status, tokens, outcome = await _send(c, path, body)
        except httpx.HTTPError as e:
            status, tokens, outcome = 599, 0, f"transport error {type(e).__name__}"
        soak.record(kind, must, status, tokens, outcome, time.perf_counter() - start)


async def _control(c: httpx.AsyncClient, body: dict[str, Any], soak: Soak, deadline: float) -> None:
    first = None
    while time.monotonic() < deadline:
        r = await c.post("/v1/chat/completions", json=body)
        text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else f"status {r.status_code}"
        first = text if first is None else first
        soak.control_runs += 1
        soak.control_mismatches += int(text != first)
        await asyncio.sleep(CONTROL_EVERY_S)


async def _sampler(pid: int, soak: Soak, start: float, deadline: float, every: float) -> None:
    while time.monotonic() < deadline:
        soak.rss.append((round(time.monotonic() - start, 1), _rss_kb(pid)))
        await asyncio.sleep(every)
    soak.rss.append((round(time.monotonic() - start, 1), _rss_kb(pid)))


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.out.with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = _start_server(args, port, log)
    try:
        model = await _wait_ready(url, proc, log)
        width = int(args.width)
        kinds = _kinds(model, args.tokens, width)
        soak = Soak()
        start = time.monotonic()
        deadline = start + args.minutes * 60
        limits = httpx.Limits(max_connections=args.clients + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
            control = _chat(model, 0, args.tokens, steering=["refusal_add"])
            await asyncio.gather(
                _sampler(proc.pid, soak, start, deadline, args.sample_s),
                _control(c, control, soak, deadline),
                *[_client(c, kinds, soak, args.seed + i, deadline) for i in range(args.clients)],
            )
            health = (await c.get("/health")).json()
        report = _report(args, soak, time.monotonic() - start, health)
        text = log.read_text(errors="replace")
        report["server_log"] = {
            "file": log.name,
            "error_lines": text.count(" ERROR "),
            "tracebacks": text.count("Traceback"),
        }
        return report
    finally:
        proc.terminate()
        proc.wait(60)


def _pct(xs: list[float], q: int) -> float:
    return round(statistics.quantiles(xs, n=100)[q - 1], 3) if len(xs) >= 2 else round(xs[0] if xs else 0.0, 3)


def _report(args: argparse.Namespace, soak: Soak, seconds: float, health: dict[str, Any]) -> dict[str, Any]:
    all_lat = [x for v in soak.latency.values() for x in v]
    # RSS moves with each batch's activations: compare medians of windows, not two samples.
    warm = [kb for t, kb in soak.rss if 0.1 * seconds <= t <= 0.25 * seconds] or [soak.rss[0][1]]
    last = [kb for t, kb in soak.rss if t >= 0.85 * seconds] or [soak.rss[-1][1]]
    rss_start, rss_end = int(statistics.median(warm)), int(statistics.median(last))
    n_5xx = sum(n for c in soak.status.values() for s, n in c.items() if s >= 500)
    return {
        "minutes": round(seconds / 60, 2),
        "clients": args.clients,
        "requests": sum(len(v) for v in soak.latency.values()),
        "5xx": n_5xx,
        "wrong_outcome": dict(soak.wrong),
        "control_runs": soak.control_runs,
        "control_mismatches": soak.control_mismatches,
        "completion_tokens_per_s": round(soak.tokens / seconds, 2),
        "latency_s": {"p50": _pct(all_lat, 50), "p99": _pct(all_lat, 99)},
        "by_kind": {
            k: {"n": len(v), "status": dict(soak.status[k]), "p50_s": _pct(v, 50), "p99_s": _pct(v, 99)}
            for k, v in sorted(soak.latency.items())
        },
        "rss_kb": {"after_warmup": rss_start, "end": rss_end, "max": max(kb for _, kb in soak.rss),
                   "growth_pct": round(100 * (rss_end - rss_start) / max(rss_start, 1), 2), "samples": soak.rss},
        "health_at_end": health,
        "targets": {"5xx": 0, "control_mismatches": 0, "rss_growth_pct_below": 5},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16, help="max_tokens of every generation request")
    p.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--width", type=int, default=576, help="the model's hidden size (for the overflowing vector)")
    p.add_argument("--threads", type=int, help="the server's torch threads")
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "server_soak.json")
    args = p.parse_args()
    report = asyncio.run(_run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: report[k] for k in ("minutes", "requests", "5xx", "wrong_outcome", "control_mismatches", "latency_s")}
    print(json.dumps(summary | {"rss_growth_pct": report["rss_kb"]["growth_pct"]}, indent=2))


if __name__ == "__main__":
    main()
