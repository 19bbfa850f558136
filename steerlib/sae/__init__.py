"""Temporary: replaced by the SAE subpackage's real exports."""
from steerlib.sae.base import Sae, SaeMeta, SparseLatents


def load_sae(path: object) -> Sae:
    raise ValueError("not yet")


def save_sae(sae: Sae, path: object) -> None:
    raise ValueError("not yet")
