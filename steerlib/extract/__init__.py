"""Make steering vectors from a model's activations on contrasting examples, or from an SAE's decoder.

    from steerlib.extract import contrastive
    vec = contrastive(model, tok, [(prompt, " (A", " (B"), ...], layers=[10, 11, 12])
    vec.save("caa.safetensors")          # then `vector: caa.safetensors` in a steering config

See ``steerlib.extract.methods`` for the methods and the papers they implement, and
``steerlib.extract.activations`` for how prompts are tokenized and activations averaged.
``steerlib.extract.probes`` fits the logistic and MLP probes a ``when`` condition reads.
"""

from steerlib.extract.methods import (
    At,
    Example,
    Pair,
    contrastive,
    diff_of_means,
    pca_direction,
    principal_direction,
    sae_decoder_row,
)
from steerlib.extract.probes import LinearProbe, fit_logistic_probe, fit_mlp_probe

__all__ = [
    "At",
    "Example",
    "LinearProbe",
    "Pair",
    "contrastive",
    "diff_of_means",
    "fit_logistic_probe",
    "fit_mlp_probe",
    "pca_direction",
    "principal_direction",
    "sae_decoder_row",
]
