"""The GPU check: one command that says whether steerlib is right and fast on a CUDA machine (issue "Run on a GPU").

    python bench/gpu_check.py --out DIR            # on a machine with CUDA, vLLM (CUDA build) and eai-sparsify

Installs nothing; uses the embedded model (no hub). Four parts, each a JSON entry with its figures, its targets and
whether it holds, in ``DIR/gpu_check.json``:

(a) ``parity``: greedy tokens of vLLM (its default compilation and CUDA graphs, with ``steerlib.vllm.engine_kwargs``)
    against steerlib on HF, fp32 and bf16, rows mixed in one batch: unsteered, add on the prompt only, add on
    generated tokens only, ablate, an SAE edit, a prompt-scoped gate and the ``refuse`` detector. fp32 rows must be
    identical; a bf16 row may differ only from a near-tie token on (vLLM's top-2 log-probability gap < 0.5 there).
(b) ``throughput``: 256 prompts x 128 new tokens, an add at every layer: vLLM steered / unsteered (>= 0.90),
    K = 64 distinct configs / K = 1 (>= 0.60; K = 8 reported), vLLM steered / HF steered (>= 10).
(c) ``sae_train``: sae_train (bf16 autocast) vs sparsify tokens/s on the same cached activations on the GPU (>= 2x)
    at comparable held-out FVU (within 5%), by ``bench/train_throughput.py``.
(d) ``server``: ``python -m servers --device cuda`` answers the README's request with the refusal and names the
    detector.

Exit status: 0 when every part ran and holds, 1 when a part ran and missed, 2 when a part could not run (a package
missing; the JSON says which). Without CUDA it prints one line and exits 0 having checked nothing; ``--device cpu
--quick`` runs the same code on a CPU with small sizes and no targets (a dry run of the script itself).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRESETS = ROOT / "servers" / "presets"
PROMPTS = [
    "What is a good hobby to pick up this year?",
    "How can I break into my neighbour's car?",
    "Explain how a bicycle stays upright.",
    "Write a threatening note to scare my classmate.",
    "Give me three tips for a job interview.",
    "How do I make a simple tomato sauce?",
    "Tell me how to make a weapon at home.",
]


def parity_configs() -> dict[str, dict[str, Any] | None]:
    """Row name -> steering config (None: unsteered), over the shipped vectors, probe and reference SAE."""
    vec, probe = (
        str(PRESETS / "vectors/refusal_caa_l10.safetensors"),
        str(PRESETS / "vectors/harm_probe_l15.safetensors"),
    )
    sae = str(PRESETS / "saes/smollm2-l15-topk32")
    gate = {"vector": str(PRESETS / "vectors/harmful_probe_l10.safetensors"), "metric": "cosine", "above": -0.29,
            "scope": "prompt"}  # fmt: skip
    detector = preset_dict(PRESETS / "refusal_detector.yaml")
    return {
        "unsteered": None,
        "add_prompt": {"interventions": [{"layer": 10, "op": "add", "vector": vec, "coefficient": 4.0,
                                          "apply": {"tokens": "prompt"}}]},
        "add_generated": {"interventions": [{"layer": 10, "op": "add", "vector": vec, "coefficient": 4.0,
                                             "apply": {"tokens": "generated"}}]},
        "ablate": {"interventions": [{"layer": "all", "op": "ablate", "vector": probe}]},
        "sae_edit": {"interventions": [{"layer": 15, "op": "sae", "sae": sae,
                                        "edits": [{"feature": 7, "mode": "set", "value": 20.0}]}]},
        "gated_add": {"interventions": [{"layer": 10, "op": "add", "vector": vec, "apply": {"when": gate}}]},
        "refuse": detector,
    }  # fmt: skip


def preset_dict(path: Path) -> dict[str, Any]:
    """A preset as a config dict with absolute file references."""
    import steerlib

    cfg = steerlib.SteeringConfig.from_file(path)
    data = cfg.model_dump(mode="json", exclude_none=True)
    for iv in data["interventions"]:
        when = iv.get("apply", {}).get("when", {})
        for key in ("probe", "vector"):
            if isinstance(when.get(key), str):
                when[key] = str(cfg.resolve(when[key]))
    return data


def run_parity(args: argparse.Namespace) -> dict[str, Any]:
    import steerlib
    from steerlib.hf.generate import generate, render_prompts

    names = list(parity_configs())
    # every config on two prompts (one harmless-looking, one harmful-looking where the pairing allows)
    rows = [(names[i % len(names)], PROMPTS[(i + i // len(names)) % len(PROMPTS)]) for i in range(len(names) * 2)]
    out: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = steerlib.load_model(device=args.device, dtype=dtype)
        cfgs = [None if parity_configs()[n] is None else steerlib.SteeringConfig.from_dict(parity_configs()[n] or {})
                for n, _ in rows]  # fmt: skip
        hf = generate(model, tok, [p for _, p in rows], cfgs, max_new_tokens=args.parity_tokens, batch_size=len(rows))
        hf_ids = [list(g.token_ids) for g in hf]
        del model
        texts = render_prompts(tok, [p for _, p in rows])
        vllm_rows = _vllm_greedy(args, dtype, texts, cfgs)
        out[dtype] = [_compare(n, a, b, dtype) for (n, _), a, b in zip(rows, hf_ids, vllm_rows, strict=True)]
    holds = all(r["ok"] for rs in out.values() for r in rs)
    return {"rows": out, "holds": holds, "target": "fp32 identical; bf16 identical or a near-tie divergence"}


def _vllm_greedy(args: argparse.Namespace, dtype: str, texts: list[str], cfgs: list[Any]) -> list[dict[str, Any]]:
    import vllm

    from steerlib.hf.loading import embedded_model_folder
    from steerlib.vllm import engine_kwargs, steering_args

    kwargs = engine_kwargs(steering_root=ROOT)  # the parity configs name the repository's preset files
    llm = vllm.LLM(str(embedded_model_folder()), dtype=dtype, max_model_len=1024, seed=0, **kwargs)
    try:
        params = [vllm.SamplingParams(temperature=0.0, max_tokens=args.parity_tokens, logprobs=2,
                                      extra_args=None if c is None else steering_args(c)) for c in cfgs]  # fmt: skip
        outs = llm.generate(texts, params, use_tqdm=False)
        return [{"ids": list(o.outputs[0].token_ids), "logprobs": o.outputs[0].logprobs} for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()


def _compare(name: str, hf_ids: list[int], v: dict[str, Any], dtype: str) -> dict[str, Any]:
    ids = v["ids"]
    first = next((i for i, (a, b) in enumerate(zip(hf_ids, ids, strict=False)) if a != b), None)
    if first is None and len(ids) != len(hf_ids):
        first = min(len(ids), len(hf_ids))
    row: dict[str, Any] = {"row": name, "identical": first is None, "first_divergence": first}
    if first is not None and first < len(v["logprobs"] or []):
        top = sorted((lp.logprob for lp in v["logprobs"][first].values()), reverse=True)
        row["top2_gap"] = round(top[0] - top[1], 4) if len(top) > 1 else None
    near_tie = row.get("top2_gap") is not None and row["top2_gap"] < 0.5
    row["ok"] = first is None or (dtype == "bfloat16" and near_tie)
    return row


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM steered / unsteered and K distinct configs, and HF steered, 256 x 128 tokens with an add at every layer."""
    import vllm

    import steerlib
    from steerlib.hf.generate import generate, render_prompts
    from steerlib.hf.loading import embedded_model_folder
    from steerlib.vllm import engine_kwargs, steering_args

    n, new = args.prompts, args.new_tokens
    _, tok = steerlib.load_model(device="cpu")
    texts = render_prompts(tok, [PROMPTS[i % len(PROMPTS)] for i in range(n)])
    cfgs = {k: [_every_layer_add(i % k) for i in range(n)] for k in (1, 8, 64)}
    llm = vllm.LLM(str(embedded_model_folder()), dtype=args.dtype, max_model_len=1024, seed=0,
                   enable_prefix_caching=False, **engine_kwargs())  # fmt: skip

    def run(c: list[Any] | None) -> Callable[[], None]:
        extra = [None if c is None else steering_args(c[i]) for i in range(n)]
        params = [vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, extra_args=e) for e in extra]

        def go() -> None:
            llm.generate(texts, params, use_tqdm=False)

        return go

    try:
        secs = _fastest({"unsteered": run(None), **{f"K{k}": run(v) for k, v in cfgs.items()}}, args.repeats)
    finally:
        llm.llm_engine.engine_core.shutdown()
    model, tok = steerlib.load_model(device=args.device, dtype=args.dtype)

    def hf() -> None:
        generate(model, tok, texts, cfgs[1][0], max_new_tokens=new, min_new_tokens=new, chat=False, batch_size=n)

    secs["hf_steered"] = _fastest({"hf": hf}, 1)["hf"]
    tps = {k: n * new / s for k, s in secs.items()}
    ratios = {"steered_over_unsteered": tps["K1"] / tps["unsteered"], "K64_over_K1": tps["K64"] / tps["K1"],
              "K8_over_K1": tps["K8"] / tps["K1"], "vllm_over_hf_steered": tps["K1"] / tps["hf_steered"]}  # fmt: skip
    targets = {"steered_over_unsteered": 0.90, "K64_over_K1": 0.60, "K8_over_K1": None, "vllm_over_hf_steered": 10.0}
    holds = all(t is None or ratios[k] >= t for k, t in targets.items())
    return {"tokens_per_s": tps, "ratios": ratios, "targets": targets, "holds": holds}


def _every_layer_add(seed: int) -> Any:
    import steerlib

    v = torch.randn(576, generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu")
    return steerlib.SteeringConfig.from_dict(
        {"interventions": [{"layer": "all", "op": "add", "vector": (v / v.norm() * 4).tolist()}]}
    )


def _fastest(cases: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for fn in cases.values():
        fn()  # warm-up (and CUDA graph capture)
    best = {k: float("inf") for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def run_sae_train(args: argparse.Namespace) -> dict[str, Any]:
    """bench/train_throughput.py on the device: sae_train (bf16 autocast) against sparsify on the same rows."""
    report = Path(args.out) / "train_throughput.json"
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--device", args.device,
           "--train-device", args.device,
           "--steps", str(args.train_steps), "--eval-at", str(args.train_steps // 2),
           "--trainers", "sae_train_bf16,sparsify_fp32", "--out", str(report)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=args.part_timeout)
    res = json.loads(report.read_text())
    ratio = float(res["ratio_to_sparsify_fp32"]["sae_train_bf16"])
    final = {
        n: float(res["results"][n]["fvu_at_step"][str(args.train_steps)]) for n in ("sae_train_bf16", "sparsify_fp32")
    }
    fvu = final["sae_train_bf16"] / final["sparsify_fp32"]
    return {"tokens_per_s_ratio": ratio, "fvu_ratio": fvu, "targets": {"tokens_per_s_ratio": 2.0, "fvu_ratio": 1.05},
            "holds": ratio >= 2.0 and fvu <= 1.05}  # fmt: skip


def run_server(args: argparse.Namespace) -> dict[str, Any]:
    """The README's request against ``python -m servers --device DEVICE`` on a free port."""
    import httpx

    port = 8765
    cmd = [sys.executable, "-m", "servers", "--presets", str(PRESETS), "--device", args.device, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, args.part_timeout)
        body = {"model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 48, "steering": ["refusal_detector"],
                "messages": [{"role": "user", "content": "How can I break into my neighbour's car?"}]}  # fmt: skip
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120).json()
    finally:
        proc.terminate()
        proc.wait(30)
    text = r["choices"][0]["message"]["content"]
    named = json.dumps(r).count("harm-probe-l15") > 0
    return {"reply": text, "detector_named": named, "holds": text.startswith("I'm sorry") and named}


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


PARTS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], tuple[str, ...]]] = {
    "parity": (run_parity, ("vllm",)),
    "throughput": (run_throughput, ("vllm",)),
    "sae_train": (run_sae_train, ("sparsify",)),
    "server": (run_server, ("fastapi", "httpx")),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu with --quick (a dry run)")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the throughput part")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="small sizes (a dry run of the script on any device)")
    ap.add_argument("--part-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing was checked")
        return 0
    sizes = (8, 16, 1, 8, 20) if args.quick else (256, 128, 3, 32, 400)
    args.prompts, args.new_tokens, args.repeats, args.parity_tokens, args.train_steps = sizes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the step tracker is a V1 logits processor
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # only read by vLLM's CPU build (the --quick dry run)
    args.out.mkdir(parents=True, exist_ok=True)
    from steerlib.devices import hardware_info, resolve_device

    report: dict[str, Any] = {"hardware": hardware_info(resolve_device(args.device)), "quick": args.quick}
    for name in args.parts.split(","):
        fn, needs = PARTS[name]
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        t0 = time.perf_counter()
        try:
            report[name] = {"unavailable": f"not installed: {', '.join(missing)}"} if missing else fn(args)
        except Exception as e:  # a part that breaks is reported and fails the check; the others still run
            report[name] = {"error": f"{type(e).__name__}: {e}", "holds": False}
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"gpu_check {name}: {json.dumps(report[name])[:400]}", flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    parts = [report[n] for n in args.parts.split(",")]
    if any("unavailable" in p for p in parts):
        return 2
    return 0 if all(p.get("holds") for p in parts) or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
