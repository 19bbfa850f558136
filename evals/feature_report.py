"""Per-token feature-ablation report: ablate one SAE feature and show how each next-token log-likelihood changes.

The view of Bricken et al. ("Towards Monosemanticity", 2023, "feature ablations"): run the text, subtract the
feature's contribution (its activation times its decoder row) at every token, finish the forward pass, and record the
change in the log-likelihood of each actual next token. Here the subtraction is steerlib's ``sae`` op with the
feature set to 0 and the error term kept, which is exactly ``x - z_f * W_dec[f]``.

The HTML page is self-contained (inline CSS, no scripts): each token has an orange background for the feature's
activation on it and an underline for the ablation effect on *its own* prediction: blue when ablating lowered its
log-likelihood (the feature helped predict it), red when it raised it. Hover a token for the numbers.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evals.lm import device_of, logprobs, make_batch, target_logprobs
from steerlib.config import SteeringConfig
from steerlib.extract.activations import run_stack
from steerlib.hf.recording import record
from steerlib.sae import load_sae
from steerlib.sites import parse_site, tl_name


@dataclass(frozen=True)
class FeatureAblation:
    tokens: list[str]
    activation: list[float]
    """The feature's activation on each token."""
    delta_logprob: list[float]
    """log p_ablated(token_t | <t) - log p_clean(token_t | <t); 0 for the first token (nothing predicts it)."""
    feature: int
    layer: int
    site: str


def feature_ablation(
    model: nn.Module, tokenizer: Any, sae_path: str | Path, *, layer: int, feature: int, text: str, site: str = ""
) -> FeatureAblation:
    """Activations of ``feature`` and the per-token effect of ablating it, on ``text`` (no chat template)."""
    sae = load_sae(sae_path)
    if not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature {feature} out of range: the SAE has {sae.d_sae} latents (0..{sae.d_sae - 1})")
    site = site or (parse_site(sae.meta.output_site)[1] if sae.meta.output_site else "resid_post")
    in_site = parse_site(sae.meta.input_site)[1] if sae.meta.input_site else site
    ids = list(tokenizer(text)["input_ids"])
    batch = make_batch(tokenizer, [ids], [0], device_of(model))
    with torch.no_grad(), record(model, [tl_name(layer, in_site)]) as rec:
        run_stack(model, batch.ids_BT, batch.mask_BT)
        acts = sae.encode(rec[tl_name(layer, in_site)].float())[:, feature]
    cfg = SteeringConfig.model_validate(
        {
            "interventions": [
                {
                    "op": "sae",
                    "layer": layer,
                    "site": site,
                    "sae": str(sae_path),
                    "edits": [{"feature": feature, "mode": "set", "value": 0.0}],
                    "error_term": "keep",
                }
            ]
        }
    )
    clean = target_logprobs(logprobs(model, batch), batch)[0]
    ablated = target_logprobs(logprobs(model, batch, cfg), batch)[0]
    # Column t of target_logprobs scores token t + 1; shift so that entry t is token t's own prediction.
    delta = [0.0, *(ablated - clean)[:-1].tolist()]
    tokens = [tokenizer.decode([i]) for i in ids]
    return FeatureAblation(tokens, acts.tolist(), delta, feature, layer, site)


def _style(act: float, max_act: float, delta: float, max_delta: float) -> str:
    alpha = 0.0 if max_act <= 0 else max(0.0, act) / max_act
    strength = 0.0 if max_delta <= 0 else min(1.0, abs(delta) / max_delta)
    colour = f"rgba(37,99,235,{strength:.3f})" if delta < 0 else f"rgba(220,38,38,{strength:.3f})"
    return f"background: rgba(249,115,22,{0.85 * alpha:.3f}); border-bottom: 3px solid {colour};"


def render_html(result: FeatureAblation, *, title: str | None = None) -> str:
    """The report as one self-contained HTML page."""
    max_act = max(result.activation, default=0.0)
    max_delta = max((abs(d) for d in result.delta_logprob), default=0.0)
    spans = []
    for tok, act, delta in zip(result.tokens, result.activation, result.delta_logprob, strict=True):
        tip = f"activation {act:.3f}; ablation changes log p(this token) by {delta:+.4f}"
        text = html.escape(tok).replace("\n", "&#8629;<br>")
        spans.append(f'<span class="t" style="{_style(act, max_act, delta, max_delta)}" title="{tip}">{text}</span>')
    heading = html.escape(title or f"Feature {result.feature} at layer {result.layer} ({result.site})")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; line-height: 2.2; }}
.t {{ white-space: pre-wrap; padding: 1px 0; }}
.legend span {{ padding: 0 .4rem; margin-right: 1rem; }}
</style></head><body>
<h1>{heading}</h1>
<p class="legend"><span style="background: rgba(249,115,22,.85)">feature active (max {max_act:.3f})</span>
<span style="border-bottom: 3px solid rgb(37,99,235)">ablation lowered log p (feature helped)</span>
<span style="border-bottom: 3px solid rgb(220,38,38)">ablation raised log p</span>
(largest change {max_delta:.4f} nats)</p>
<p>{"".join(spans)}</p>
</body></html>
"""


def write_report(result: FeatureAblation, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result), encoding="utf-8")
    return path
