"""Export a steerlib SAE to SAELens' folder layout (``cfg.json`` + ``sae_weights.safetensors``).

Architectures map as SAELens 6 names them: relu -> ``standard``, topk -> ``topk``, jumprelu -> ``jumprelu``,
gated -> ``gated``; a BatchTopK SAE's global threshold θ becomes a ``jumprelu`` with θ for every latent (the same
function: ``relu(pre)·(relu(pre) > θ)`` equals ``relu(pre)·(pre > θ)`` for θ ≥ 0, which is how SAELens itself
saves trained BatchTopK SAEs). Transcoders become ``transcoder`` / ``skip_transcoder`` / ``jumprelu_transcoder``
with ``W_skip`` stored transposed, as SAELens does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from sae_train.checkpoint import atomic_write_bytes
from steerlib.sae import Sae


def _architecture(sae: Sae) -> str:
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated", "batchtopk": "jumprelu"}
    if sae.architecture not in arch:
        raise ValueError(f"cannot export architecture {sae.architecture!r} to SAELens; supported: {sorted(arch)}")
    name = arch[sae.architecture]
    if not sae.is_transcoder:
        return name
    if name == "standard":
        return "skip_transcoder" if sae.W_skip is not None else "transcoder"
    if name == "jumprelu" and sae.W_skip is None:
        return "jumprelu_transcoder"
    raise ValueError(f"SAELens has no {sae.architecture} transcoder{' with skip' if sae.W_skip is not None else ''}")


def export_saelens(sae: Sae, folder: str | os.PathLike[str]) -> Path:
    """Write ``sae`` as a SAELens folder; ``steerlib.load_sae`` reads it back to the same function."""
    out = Path(folder)
    arch = _architecture(sae)
    tensors = {n: t.detach().cpu().contiguous() for n, t in sae.state_dict().items()}
    if sae.architecture == "batchtopk":
        tensors["threshold"] = tensors["threshold"].expand(sae.d_sae).contiguous()
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    m = sae.meta
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": m.d_in,
        "d_sae": m.d_sae,
        "dtype": str(tensors["W_dec"].dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.subtract_b_dec,
        "normalize_activations": "none",
        "metadata": {"model_name": m.model, "hook_name": m.input_site, "sae_lens_training_version": None},
    }
    if sae.is_transcoder:
        cfg["d_out"] = m.d_out
        cfg["metadata"]["hook_name_out"] = m.output_site
    if arch == "topk":
        cfg["k"] = m.k
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ".sae_weights.tmp"))
    os.replace(out / ".sae_weights.tmp", out / "sae_weights.safetensors")
    atomic_write_bytes(out / "cfg.json", (json.dumps(cfg, indent=2) + "\n").encode())
    return out
