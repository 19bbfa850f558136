"""The refusal-feature-ablation attack: find the model's refusal direction and project it out everywhere.

Refusal direction (Arditi et al., "Refusal in language models is mediated by a single direction", arXiv 2406.11717):
the difference of mean activations between harmful and harmless *training* prompts at the last prompt token (after
the chat template's assistant header) at one middle layer. Ablating it at every layer and at every site that writes
the residual stream removes refusal; ReFAT (Yu et al., "Robust LLM safeguarding via refusal feature adversarial
training", arXiv 2409.20089) uses exactly this ablation as the attack it trains against, and as the robustness test
this module provides: refusal rate under the attack, for the base model and for each steered config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from evals.datasets import HARMFUL_SETS, HARMLESS_SETS, load_dataset, split
from steerlib.config import SteeringConfig
from steerlib.extract import diff_of_means
from steerlib.hf.layout import get_layout

logger = logging.getLogger(__name__)

ATTACK_SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")
"""Arditi et al. ablate at every layer's input and at every attention and MLP output."""


def middle_layer(model: nn.Module) -> int:
    return get_layout(model).n_layers // 2


def attack_prompts(n: int) -> tuple[list[str], list[str]]:
    """Training prompts for the attack's direction: the first ``n`` harmful and harmless ones, round-robin over the
    recipes' sets (:data:`evals.datasets.HARMFUL_SETS`, :data:`~evals.datasets.HARMLESS_SETS`)."""

    def take(names: Sequence[str]) -> list[str]:
        per = [[p.text for p in split(load_dataset(name), "train")] for name in names]
        mixed = [ps[i] for i in range(max(map(len, per))) for ps in per if i < len(ps)]
        return mixed[:n]

    return take(HARMFUL_SETS), take(HARMLESS_SETS)


def refusal_direction(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layer: int | None = None,
    site: str = "resid_post",
    batch_size: int = 8,
) -> Tensor:
    """``mean(harmful) - mean(harmless)`` at the last prompt token of ``layer`` (default: the middle layer).

    Give *training* prompts (``evals.datasets.split(..., "train")``): the direction must not see scored prompts.
    """
    layer = middle_layer(model) if layer is None else layer
    vec = diff_of_means(model, tokenizer, list(harmful), list(harmless), layers=layer, site=site, batch_size=batch_size)
    d = vec.by_layer[None]
    logger.info(
        "refusal direction at layer %d (%s): norm %.2f from %d + %d prompts",
        layer,
        site,
        float(d.norm()),
        len(harmful),
        len(harmless),
    )
    return d


def describe_attack(layer: int, n_harmful: int, n_harmless: int, sites: Sequence[str] = ATTACK_SITES) -> str:
    """What :func:`ablation_attack` on a :func:`refusal_direction` does, for reports."""
    return (
        f"ablate the attacked model's own refusal direction (layer {layer}, resid_post) at every layer "
        f"({', '.join(sites)}), from {n_harmful}+{n_harmless} training prompts"
    )


def ablation_attack(direction: Tensor, sites: Sequence[str] = ATTACK_SITES) -> SteeringConfig:
    """Project ``direction`` out at every layer and each of ``sites`` (all tokens)."""
    if float(direction.norm()) == 0.0:
        raise ValueError("cannot ablate a zero direction")
    v = direction.detach().float().cpu().tolist()
    return SteeringConfig.model_validate(
        {"interventions": [{"op": "ablate", "layer": "all", "site": s, "vector": v} for s in sites]}
    )
