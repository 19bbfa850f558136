"""The SAE file formats :func:`steerlib.sae.load_sae` reads, in detection order.

steerlib's own format comes first because it shares ``cfg.json`` + ``sae.safetensors`` with sparsify and is told apart
by the ``format_version`` key of its config.
"""

from __future__ import annotations

from steerlib.sae.formats import dictionary_learning, gemma_scope, native, saelens, sparsify
from steerlib.sae.formats._common import SaeFormat

FORMATS: tuple[SaeFormat, ...] = (
    native.FORMAT,
    saelens.FORMAT,
    sparsify.FORMAT,
    gemma_scope.FORMAT,
    dictionary_learning.FORMAT,
)

__all__ = ["FORMATS", "SaeFormat"]
