"""Steering overhead on the embedded model: generation time steered / unsteered, measured alternately in one run.

    python bench/steering_overhead.py [--batch 8] [--new-tokens 64] [--repeats 3] [--threads 1] [--device D] [--dtype T]

Targets (issue 2): add at one layer <= 1.03; SAE edit at one layer with 4608 latents <= 1.10; conditional
(``when``) <= 1.10, also for a ``refuse`` detector read from the prompt (a linear probe, or an MLP probe of the mean
activation the size of the shipped one, 32 x 576; never firing here, so every arm generates the same tokens). The SAE
and the probes are random: their cost does not depend on their weights. Writes
``bench/results/steering_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import steerlib
from steerlib.devices import add_device_arguments, hardware_info
from steerlib.mlp_probe import MlpProbe
from steerlib.sae import get_architecture, save_sae
from steerlib.sae.base import SaeMeta

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how vaccines work.",
    "What are the main causes of inflation?",
    "Give me a recipe for pancakes.",
    "Describe the water cycle.",
    "What is the capital of Australia and why?",
    "How do I learn to play the guitar?",
    "Summarise the plot of Hamlet.",
]
LAYER = 15


def random_sae(folder: Path, d_model: int, d_sae: int = 4608, k: int = 32) -> Path:
    torch.manual_seed(0)
    meta = SaeMeta(
        "topk", d_model, d_sae, d_model, f"blocks.{LAYER}.hook_resid_post", f"blocks.{LAYER}.hook_resid_post", k=k
    )
    sae = get_architecture("topk")(meta)
    with torch.no_grad():
        sae.W_enc.normal_(0, d_model**-0.5)
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
    save_sae(sae, folder)
    return folder


def random_mlp_probe(path: Path, d_model: int, hidden: int = 32) -> Path:
    g = torch.Generator().manual_seed(3)
    return MlpProbe(torch.randn(hidden, d_model, generator=g), torch.zeros(hidden), torch.randn(hidden, generator=g),
                    torch.tensor(0.0)).save(path)  # fmt: skip


def refuse(when: dict[str, Any]) -> steerlib.SteeringConfig:
    when = when | {"above": 1e30, "scope": "prompt", "aggregate": "mean"}  # never fires: same tokens as unsteered
    return steerlib.SteeringConfig.model_validate(
        {"interventions": [{"op": "refuse", "layer": LAYER, "apply": {"when": when}}]}
    )


def configs(sae_dir: Path, mlp_probe: Path, d_model: int) -> dict[str, steerlib.SteeringConfig]:
    v = (torch.randn(d_model, generator=torch.Generator().manual_seed(1)) * 4).tolist()
    probe = torch.randn(d_model, generator=torch.Generator().manual_seed(2)).tolist()
    return {
        "add_1_layer": steerlib.SteeringConfig.model_validate(
            {"interventions": [{"op": "add", "layer": LAYER, "vector": v, "coefficient": 1.0}]}
        ),
        "sae_edit_1_layer_4608": steerlib.SteeringConfig.model_validate(
            {
                "interventions": [
                    {
                        "op": "sae",
                        "layer": LAYER,
                        "sae": str(sae_dir),
                        "edits": [
                            {"feature": 123, "mode": "set", "value": 8.0},
                            {"feature": 77, "mode": "scale", "value": 0.0},
                        ],
                    }
                ]
            }
        ),
        "conditional_when_probe": steerlib.SteeringConfig.model_validate(
            {
                "interventions": [
                    {"op": "add", "layer": LAYER, "vector": v, "apply": {"when": {"vector": probe, "above": 0.0}}}
                ]
            }
        ),
        "conditional_when_sae_feature": steerlib.SteeringConfig.model_validate(
            {
                "interventions": [
                    {
                        "op": "add",
                        "layer": LAYER,
                        "vector": v,
                        "apply": {"when": {"sae": str(sae_dir), "feature": 5, "above": 0.0}},
                    }
                ]
            }
        ),
        "refuse_when_linear_probe_mean": refuse({"vector": probe}),
        "refuse_when_mlp_probe_mean": refuse({"probe": str(mlp_probe)}),
    }


def timed_generate(
    model: Any, enc: dict[str, torch.Tensor], new_tokens: int, cfg: steerlib.SteeringConfig | None
) -> float:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 2}
    device = enc["input_ids"].device
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        if cfg is None:
            model.generate(**enc, **kwargs)
        else:
            with steerlib.steer(model, cfg):
                model.generate(**enc, **kwargs)
    _sync(device)  # a GPU's queued work counts toward the time it took
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    add_device_arguments(ap)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "steering_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = steerlib.load_model(device=args.device, dtype=args.dtype)
    params = next(model.parameters())
    d_model = model.config.hidden_size
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(params.device)
    with tempfile.TemporaryDirectory() as tmp:
        mlp_probe = random_mlp_probe(Path(tmp) / "probe.safetensors", d_model)
        cfgs = configs(random_sae(Path(tmp) / "sae", d_model), mlp_probe, d_model)
        timed_generate(model, enc, 4, None)  # warm-up
        results: dict[str, Any] = {}
        for name, cfg in cfgs.items():
            base, steered = [], []
            for _ in range(args.repeats):  # alternate so drift in machine load hits both sides alike
                base.append(timed_generate(model, enc, args.new_tokens, None))
                steered.append(timed_generate(model, enc, args.new_tokens, cfg))
            ratio = statistics.median(s / b for s, b in zip(steered, base, strict=True))
            results[name] = {"ratio": round(ratio, 4), "unsteered_s": base, "steered_s": steered}
            print(f"{name:32s} steered/unsteered = {ratio:.3f}  (median of {args.repeats} alternated pairs)")
    report = {
        "bench": "steering_overhead",
        "model": "SmolLM2-135M-Instruct (embedded)",
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "dtype": str(params.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "hardware": hardware_info(params.device),
        "targets": {
            "add_1_layer": 1.03,
            "sae_edit_1_layer_4608": 1.10,
            "conditional_when_probe": 1.10,
            "conditional_when_sae_feature": 1.10,
            "refuse_when_linear_probe_mean": 1.10,
            "refuse_when_mlp_probe_mean": 1.10,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
