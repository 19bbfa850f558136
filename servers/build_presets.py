"""Rebuild the shipped presets in ``servers/presets/`` for the embedded SmolLM2-135M-Instruct.

    python -m servers.build_presets --harmful harmful_probes.txt --harmless harmless_probes.txt

(the two files of the PyPI package ``temaq-abliterated==1.1.1``, ``temaq_abliterated/data/``; any one-prompt-per-line
files work). Writes ``vectors/refusal.safetensors``: the difference of means of the residual stream after layer
``LAYER`` at the last prompt token, harmful minus harmless (Arditi et al., arXiv 2406.11717), 576 floats; and
``saes/refusal_probe``: a one-latent ReLU "SAE" whose encoder and decoder are that direction (unit norm), so
feature 0 reads how far an activation points along it and an SAE edit of feature 0 moves it along it.
The separation of held-out prompts (AUC of the projection) is logged and stored in the vector's metadata.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from steerlib.extract import diff_of_means
from steerlib.extract.activations import model_device, prompt_ids
from steerlib.hf.loading import EMBEDDED_NAME, load_model
from steerlib.hf.recording import record
from steerlib.sae import ReluSae, SaeMeta, save_sae
from steerlib.vectors import SteeringVector

log = logging.getLogger(__name__)
LAYER = 15
SITE = f"blocks.{LAYER}.hook_resid_post"
N_TRAIN, N_TEST = 96, 48


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _projections(model: torch.nn.Module, tok: object, prompts: list[str], unit_D: torch.Tensor) -> torch.Tensor:
    """Projection of the last prompt token's resid_post(LAYER) on ``unit_D``, one prompt at a time."""
    out = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tok, p, True)], device=model_device(model))  # type: ignore[arg-type]
        with torch.no_grad(), record(model, [SITE]) as rec:
            model(input_ids=ids)
        out.append(float(rec[SITE][-1] @ unit_D))
    return torch.tensor(out, device="cpu")


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    return float((pos[:, None] > neg[None, :]).float().mean())


def build(harmful: list[str], harmless: list[str], out: Path) -> None:
    model, tok = load_model(None)
    vec = diff_of_means(model, tok, harmful[:N_TRAIN], harmless[:N_TRAIN], layers=LAYER, batch_size=8)
    v_D = vec.for_layer(LAYER)
    unit_D = v_D / v_D.norm()
    auc = _auc(
        _projections(model, tok, harmful[N_TRAIN : N_TRAIN + N_TEST], unit_D),
        _projections(model, tok, harmless[N_TRAIN : N_TRAIN + N_TEST], unit_D),
    )
    log.info("refusal direction at layer %d: norm %.1f, held-out AUC %.3f", LAYER, float(v_D.norm()), auc)
    meta = {
        **vec.metadata,
        "model": EMBEDDED_NAME,
        "layer": LAYER,
        "heldout_auc": round(auc, 4),
        "n_heldout": 2 * N_TEST,
    }
    SteeringVector.single(v_D, **meta).save(out / "vectors" / "refusal.safetensors")
    sae = ReluSae(SaeMeta("relu", 576, 1, 576, input_site=SITE, output_site=SITE, model=EMBEDDED_NAME))
    with torch.no_grad():
        sae.W_enc.copy_(unit_D[:, None])
        sae.W_dec.copy_(unit_D[None, :])
    save_sae(sae, out / "saes" / "refusal_probe", overwrite=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harmful", type=Path, required=True)
    p.add_argument("--harmless", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "presets")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    build(_lines(args.harmful), _lines(args.harmless), args.out)


if __name__ == "__main__":
    main()
