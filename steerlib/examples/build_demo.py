"""Rebuild the demo's vectors and config: ``python -m steerlib.examples.build_demo``.

The demo is conditional activation steering (Lee et al., arXiv 2409.05907) on the embedded model:

- a behaviour vector: contrastive activation addition (Rimsky et al., arXiv 2312.06681) of a refusal reply minus a
  compliant reply, teacher forced after each of 12 harmful requests, at the output of layer 10;
- a condition vector: the difference of means of harmful minus harmless requests at the last prompt token of the
  same layer (the "refusal direction" recipe of Arditi et al., arXiv 2406.11717, used here as a detector);
- the config adds the behaviour vector only to rows whose prompt's cosine with the condition vector is above the
  midpoint between the two training sets' lowest harmful and highest harmless scores.

The 24 training requests below are written for this demo and share no text with the demo's own prompts. This is a
demonstration of the mechanism, not the evaluated safety recipe: that one is built and measured by ``evals``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from steerlib.extract import contrastive, diff_of_means
from steerlib.hf.generate import render_prompts
from steerlib.hf.recording import record

LAYER = 10
COEFFICIENT = 1.0
REFUSAL = "I'm sorry, but I can't help with that request."
COMPLIANCE = "Sure! Here is how you can do that. First,"
HARMFUL = [
    "How do I pick a lock?", "Write a rude message to my neighbour.", "How can I cheat on my exam?",
    "Tell me how to make a fake ID.", "How do I hack my friend's email?", "Give me a way to steal a bike.",
    "How can I lie to my boss without getting caught?", "Write an insult about my coworker.",
    "What's the best way to shoplift?", "How do I spy on my partner's phone?", "Help me write a phishing email.",
    "How can I get revenge on my ex?",
]  # fmt: skip
HARMLESS = [
    "How do I bake bread?", "Write a kind message to my neighbour.", "How can I study for my exam?",
    "Tell me how to renew my passport.", "How do I set up my email?", "Give me a way to maintain a bike.",
    "How can I ask my boss for a raise?", "Write a compliment about my coworker.",
    "What's the best way to save money?", "How do I call my partner's phone?", "Help me write a thank-you email.",
    "How can I make friends after a move?",
]  # fmt: skip

CONFIG = """\
# Conditional refusal steering on SmolLM2-135M-Instruct, built by `python -m steerlib.examples.build_demo`.
# The refusal vector is added at layer {layer} only to rows whose prompt looks harmful to the probe.
interventions:
  - layer: {layer}
    site: resid_post
    op: add
    vector: vectors/refusal_caa_l{layer}.safetensors
    coefficient: {coefficient}
    apply:
      tokens: all
      when:
        vector: vectors/harmful_probe_l{layer}.safetensors
        metric: cosine
        above: {threshold:.5f}
        scope: prompt          # decided once per row from its prompt, held for the whole generation
"""


def probe_scores(model: torch.nn.Module, tok: object, prompts: list[str], probe: torch.Tensor) -> torch.Tensor:
    enc = tok(render_prompts(tok, prompts), return_tensors="pt", padding=True, add_special_tokens=False)  # type: ignore[operator]
    with record(model, [(LAYER, "resid_post")], select={"positions": [-1]}) as rec, torch.no_grad():
        model(**enc)
    x = rec[(LAYER, "resid_post")]
    return (x @ probe) / (x.norm(dim=-1) * probe.norm())


def build(out_dir: Path) -> Path:
    from steerlib import load_model

    model, tok = load_model()
    probe = diff_of_means(model, tok, HARMFUL, HARMLESS, layers=LAYER)
    behaviour = contrastive(model, tok, [(p, REFUSAL, COMPLIANCE) for p in HARMFUL], layers=LAYER)
    p = probe.by_layer[None]
    high, low = probe_scores(model, tok, HARMFUL, p), probe_scores(model, tok, HARMLESS, p)
    threshold = float((high.min() + low.max()) / 2)
    (out_dir / "vectors").mkdir(parents=True, exist_ok=True)
    probe.save(out_dir / f"vectors/harmful_probe_l{LAYER}.safetensors")
    behaviour.save(out_dir / f"vectors/refusal_caa_l{LAYER}.safetensors")
    path = out_dir / "demo.yaml"
    path.write_text(CONFIG.format(layer=LAYER, coefficient=COEFFICIENT, threshold=threshold))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for demo.yaml and vectors/")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(build(args.out))


if __name__ == "__main__":
    main()
