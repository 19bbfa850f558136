"""Site names: where in a decoder layer an intervention reads and writes.

Names follow TransformerLens (``blocks.{L}.hook_{site}``):

- ``resid_pre``  the residual stream entering layer L (its input);
- ``resid_post`` the residual stream leaving layer L (its output; ``hidden_states[L + 1]`` in transformers);
- ``attn_out``   the attention block's output, before it is added to the residual stream (and before any
  post-attention norm an architecture applies, as in Gemma 2/3);
- ``mlp_in``     the MLP's input (after the pre-MLP norm): what a transcoder reads;
- ``mlp_out``    the MLP's output, before it is added to the residual stream: what a transcoder writes.
"""

from __future__ import annotations

import re

SITES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_in")

_TL_NAME = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")


def parse_site(name: str) -> tuple[int | None, str]:
    """``'resid_post'`` -> ``(None, 'resid_post')``; ``'blocks.15.hook_resid_post'`` -> ``(15, 'resid_post')``.

    Unknown names are returned as given; the config's validator reports them with the allowed values.
    """
    m = _TL_NAME.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name


def tl_name(layer: int, site: str) -> str:
    """The TransformerLens name of a site."""
    return f"blocks.{layer}.hook_{site}"
