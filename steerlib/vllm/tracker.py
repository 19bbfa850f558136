"""A vLLM logits processor that follows requests through vLLM's persistent batch (and forces refusals).

vLLM tells logits processors, before every forward step, which requests were added to, removed from or moved
within its persistent batch, with their ``SamplingParams``. That is exactly what per-request steering needs, through
a public interface (``logits_processors=[...]``) instead of a patched model runner. ``validate_params`` runs in the
front end when a request arrives, so a malformed steering config is rejected there (HTTP 400 on the server).
Logits are left alone except for requests whose prompt fired a ``refuse`` op: they get its message, then
end-of-turn (``prefill`` mode: no end-of-turn, the model continues after the message).
Needs vLLM's V1 model runner, which the plugin selects (``steerlib.vllm.plugin``); the V2 runner refuses V1 logits
processors at startup. A steered request reaches the tracker only once ``SteeringScheduler`` has accepted it for
this model, so a model without steerable layers never gets one; an engine started without that scheduler gets an
error here, never an unsteered answer.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from steerlib.vllm import capture
from steerlib.vllm import state as steering_state
from steerlib.vllm.params import parse_steering


class StepTracker(LogitsProcessor):
    """Feeds batch changes to the worker's :class:`~steerlib.vllm.state.SteeringState`."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        parse_steering(sampling_params.extra_args)  # raises ValueError naming the bad field
        capture.sites_of(sampling_params.extra_args)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device

    def is_argmax_invariant(self) -> bool:
        return False  # rows answered by a ``refuse`` detector get their message forced, greedy or not

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        st = steering_state.current()
        if st is None or not st.refusing():
            return logits
        forced = st.forced_tokens()
        if forced:
            rows = torch.tensor(list(forced), device=logits.device)
            logits[rows] = -torch.inf
            logits[rows, torch.tensor(list(forced.values()), device=logits.device)] = 0.0
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        st = steering_state.current()
        if st is None:
            if any(parse_steering(params.extra_args) is not None for _, params, _, _ in batch_update.added):
                raise RuntimeError(
                    "steerlib: a steered request reached a model without steerable layers; start the engine with "
                    "steerlib.vllm.engine_kwargs() (its scheduler refuses such requests one by one, naming the "
                    "architecture)"
                )
            return
        for index in batch_update.removed:
            st.remove(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            n_prompt = 0 if prompt_ids is None else len(prompt_ids)
            st.add(index, params.extra_args, n_prompt, owner=output_ids, lifetime=params)
        for src, dst, how in batch_update.moved:
            st.move(src, dst, swap=how == MoveDirectionality.SWAP)
