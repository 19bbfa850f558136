"""Shared pieces of the feature-browser tests: a tiny seeded SAE outside the presets folder and a feature index
folder for it, either measured with ``steerlib.feature_stats`` or written by hand with planted records.
(No tests here; the test files import these.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from test_server_support import MODEL_NAME, SAE_LAYER, D, make_presets
from tiny_models import tiny_model, word_tokenizer
from torch import nn

from servers.app import create_app
from servers.settings import ServerSettings
from steerlib.feature_stats import feature_stats, max_activating_contexts, vocab_projection
from steerlib.sae import ReluSae, Sae, SaeMeta, save_sae
from steerlib.vectors import SteeringVector

F = 32
SITE = f"blocks.{SAE_LAYER}.hook_resid_post"
PLANTED = 5
"""The latent whose decoder row the ``planted`` preset vector copies, and whose explanation mentions weather."""


def make_sae(folder: Path) -> Sae:
    gen = torch.Generator().manual_seed(7)
    sae = ReluSae(SaeMeta("relu", D, F, D, input_site=SITE, output_site=SITE, model=MODEL_NAME))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=gen) / 4)
        sae.W_dec.copy_(torch.randn(F, D, generator=gen))
    save_sae(sae, folder)
    return sae


def write_index(
    folder: Path, sae_path: Path, features: list[dict[str, Any]], explanations: list[dict[str, Any]]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"sae": str(sae_path), "site": SITE, "model": MODEL_NAME, "d_sae": F, "n_tokens": 100, "sources": ["t"]}
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "features.jsonl").write_text("".join(json.dumps(r) + "\n" for r in features))
    if explanations:
        (folder / "explanations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in explanations))
    return folder


def explanation(feature: int, text: str) -> dict[str, Any]:
    return {
        "feature": feature,
        "explanation": text,
        "detection": 0.9,
        "fuzzing": None,
        "explainer": "t",
        "n_examples": 4,
    }


def measured_index(folder: Path, sae_path: Path, model: nn.Module, tokenizer: Any, sae: Sae) -> Path:
    """An index of every latent measured on seeded word texts, the way ``evals.autointerp index`` would."""
    gen = torch.Generator().manual_seed(3)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(5, 127, (12,), generator=gen)) for _ in range(16)]
    stats = feature_stats(model, tokenizer, sae, texts, k=4)
    rows = []
    for f in range(F):
        vp = vocab_projection(model, tokenizer, sae, f, k=5)
        edges = torch.logspace(-3, 3, 25).tolist()
        rows.append(
            {
                "feature": f,
                "frequency": float(stats.frequency_F[f]),
                "mean_activation": float(stats.mean_F[f]),
                "max_activation": float(stats.max_F[f]),
                "histogram": {"edges": edges, "counts": [int(c) for c in stats.hist_FB[f]]},
                "top_contexts": [
                    {"tokens": c.tokens, "activations": c.activations}
                    for c in max_activating_contexts(model, tokenizer, sae, stats, f, window=4)
                ],
                "vocab_top": [list(p) for p in vp.promoted],
                "vocab_bottom": [list(p) for p in vp.suppressed],
            }
        )
    return write_index(folder, sae_path, rows, [explanation(PLANTED, "planted weather feature")])


def browser_app(tmp: Path, *, writes: bool = True, **settings: Any) -> tuple[FastAPI, nn.Module, Any]:
    """The server on the tiny model: presets folder (with ``vectors/planted``), and the measured index ``tiny``."""
    model, tokenizer = tiny_model("llama", 3), word_tokenizer()
    presets = make_presets(tmp / "presets")
    sae = make_sae(tmp / "sae")
    SteeringVector.single(sae.W_dec[PLANTED].detach() * 3).save(presets / "vectors" / "planted.safetensors")
    index = measured_index(tmp / "tiny", tmp / "sae", model, tokenizer, sae)
    s = ServerSettings.model_validate(
        {"presets": presets, "features": [index], "allow_preset_writes": writes, "batch_wait_ms": 5} | settings
    )
    return create_app(s, model, tokenizer, MODEL_NAME), model, tokenizer
