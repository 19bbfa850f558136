"""Which token is which in an HF forward step: a pre-hook on the decoder stack fills a :class:`StepState`.

The stack (``model.model``, ``model.transformer``, ...) is called once per step with ``input_ids``,
``attention_mask`` and the KV cache (``past_key_values``; ``cache`` from transformers 5.25 on). A step that starts
with an empty cache starts new sequences: its tokens are the prompt. Later steps (decoding with the cache) carry
generated tokens. Left padding is read from the attention mask, so positions count real tokens only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from steerlib.tokens import TokenBatch, from_padded


@dataclass
class StepState:
    """What the stack pre-hook learnt about the current step, read by the site hooks."""

    tokens: TokenBatch | None = None
    prompt_len_B: Tensor | None = None

    def batch(self) -> TokenBatch:
        if self.tokens is None:
            raise RuntimeError(
                "steering hooks ran before the decoder stack's pre-hook: call the model (or its decoder stack) "
                "that steer()/attach()/record() was given, not a single layer"
            )
        return self.tokens


def stack_pre_hook(base: nn.Module, state: StepState) -> Callable[..., None]:
    """A ``with_kwargs`` forward pre-hook for the decoder stack that updates ``state`` each step."""
    sig = inspect.signature(base.forward)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = sig.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})

        def get(name: str) -> Any:
            return bound.get(name, extra.get(name))

        ids, embeds = get("input_ids"), get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise RuntimeError("steering needs input_ids or inputs_embeds to describe the step's tokens")
        batch, n_new = int(ref.shape[0]), int(ref.shape[1])
        cache = get("past_key_values")
        past = past_length(cache if cache is not None else get("cache"))  # transformers >= 5.25 passes ``cache``
        if past == 0 or state.prompt_len_B is None or state.prompt_len_B.shape[0] != batch:
            state.prompt_len_B = None  # a new sequence starts: its tokens in this step are the prompt
        state.tokens = from_padded(get("attention_mask"), batch, n_new, past, state.prompt_len_B, ids, ref.device)
        state.prompt_len_B = state.tokens.prompt_len_R

    return hook


def past_length(past: Any) -> int:
    """Tokens already in a KV cache (a transformers ``Cache`` or the legacy tuple of tuples)."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, tuple | list) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0
