"""steerlib: steering vectors, directional ablation and SAE feature edits inside a language model's forward pass.

    import steerlib
    model, tok = steerlib.load_model()                     # the embedded SmolLM2-135M-Instruct
    cfg = steerlib.SteeringConfig.from_file("steer.yaml")
    with steerlib.steer(model, cfg, tokenizer=tok):
        model.generate(...)

Importing steerlib needs torch only; transformers is imported when a model is loaded, vLLM only by its plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from steerlib.config import (
    AblateOp,
    AddOp,
    ApplyPolicy,
    Condition,
    FeatureEdit,
    ReplaceOp,
    SaeOp,
    SteeringConfig,
    TokenSelector,
)
from steerlib.hf.hooks import SteeringHandle, attach, hooks_installed, steer
from steerlib.hf.recording import Recording, record
from steerlib.mlp_probe import MlpProbe, load_mlp_probe
from steerlib.plan import SteeringConfigError
from steerlib.sae import Sae, load_sae, save_sae
from steerlib.vectors import SteeringVector, load_vector

if TYPE_CHECKING:
    from steerlib.hf.loading import load_model


def __getattr__(name: str) -> Any:
    # load_model pulls in transformers; import it on first use only.
    if name == "load_model":
        from steerlib.hf.loading import load_model

        return load_model
    raise AttributeError(f"module 'steerlib' has no attribute {name!r}")


__all__ = [
    "AblateOp",
    "AddOp",
    "ApplyPolicy",
    "Condition",
    "FeatureEdit",
    "MlpProbe",
    "Recording",
    "ReplaceOp",
    "Sae",
    "SaeOp",
    "SteeringConfig",
    "SteeringConfigError",
    "SteeringHandle",
    "SteeringVector",
    "TokenSelector",
    "attach",
    "hooks_installed",
    "load_mlp_probe",
    "load_model",
    "load_sae",
    "load_vector",
    "record",
    "save_sae",
    "steer",
]
