"""The ``vllm.general_plugins`` entry point: makes vLLM build steerable models of every covered family.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers) before any model is
built, so the decoder layers have their steering sites from the start and are compiled with them
(``torch.compile`` traces ``torch.ops.steerlib.site`` as an opaque op, see ``steerlib.vllm.layers``). Each steerable
architecture (``steerlib.vllm.families``: Llama, Mistral, Phi-3, Qwen2, Qwen3, Gemma 2, Gemma 3, Granite, Qwen2-MoE,
Mixtral, OLMo-2) is registered as ``steerlib.vllm.models:<architecture>``, imported only when vLLM builds one.
Registering again is harmless: vLLM may load plugins more than once.

Two process-wide settings, both made here because this is the one place that runs in every vLLM process before its
configuration is read:

- ``STEERLIB_VLLM_DISABLE=1`` (or ``true``/``yes``) makes :func:`register` return at once: vLLM builds its own
  classes and runs as if steerlib were not installed. The steering scheduler then refuses steered requests (naming
  the switch), so none is answered unsteered.
- **vLLM's V1 model runner.** steerlib's step tracker is a V1 logits processor (``BatchUpdate`` reports rows added,
  removed and moved, which per-request steering follows). vLLM 0.32 chooses its runner from the environment only
  (``VLLM_USE_V2_MODEL_RUNNER``; no engine argument or flag), defaults to V2 where Triton runs (GPUs) and there
  refuses V1 logits processors at startup. So :func:`register` sets ``VLLM_USE_V2_MODEL_RUNNER=0`` when it is unset:
  no user has to export anything, offline or with ``vllm serve``. An explicit ``VLLM_USE_V2_MODEL_RUNNER=1`` is left
  alone and logged; vLLM then refuses the tracker at startup (an error naming it, never silent steering loss).
  Why not steer under V2: its logits processors see request slots (``add_request(slot, params)``) but no removals,
  and the model's forward would need the step's row-to-slot mapping, which V2 keeps in its runner (the forward
  context carries only attention metadata); V1 is a supported runner of vLLM 0.32.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

DISABLE_ENV = "STEERLIB_VLLM_DISABLE"
"""Set to 1 to leave vLLM untouched."""
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
_TRUE = ("1", "true", "yes", "on")


def disabled() -> bool:
    """True if ``STEERLIB_VLLM_DISABLE`` asks the plugin to leave vLLM alone."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in _TRUE


def register() -> None:
    """Register the steerable model classes with vLLM's ``ModelRegistry`` and select vLLM's V1 model runner."""
    if disabled():
        log.info("steerlib: %s is set; vLLM is left untouched (steered requests will be refused)", DISABLE_ENV)
        return
    from vllm import ModelRegistry

    from steerlib.vllm.families import steerable_architectures

    if os.environ.setdefault(RUNNER_ENV, "0").strip().lower() in _TRUE:
        log.warning("steerlib: %s=1 is set; the step tracker needs vLLM's V1 model runner", RUNNER_ENV)
    archs = steerable_architectures(_vllm_text_models())
    for arch in archs:
        ModelRegistry.register_model(arch, f"steerlib.vllm.models:{arch}")
    log.debug("steerlib: steerable architectures registered: %s", ", ".join(sorted(archs)))


def _vllm_text_models() -> dict[str, tuple[str, str]]:
    from vllm.model_executor.models import registry

    return dict(registry._TEXT_GENERATION_MODELS)
