"""steerlib inside vLLM: per-request steering and SAE edits in vLLM's own engine, through its extension points.

Importing this package does not import vLLM; its modules that do are loaded by vLLM itself (the plugin entry point,
``logits_processors`` and ``scheduler_cls``) or on first use. What each piece does:

- ``plugin.register`` (entry point ``vllm.general_plugins``): registers a steerable model class for every covered
  architecture (``families``: Llama, Mistral, Phi-3, Qwen2, Qwen3, Gemma 2, Gemma 3, Granite, OLMo-2; Qwen2-MoE and
  Mixtral on the residual stream), made on demand from vLLM's own class (``models``); every decoder layer, and its
  attention and MLP, then call ``torch.ops.steerlib.site`` at each site (``layers``). ``STEERLIB_VLLM_DISABLE=1``
  leaves vLLM untouched. It also selects vLLM's V1 model runner, which the tracker needs (see ``plugin``).
- ``tracker.StepTracker`` (a vLLM logits processor): follows which request sits in which row of vLLM's persistent
  batch, with its ``SamplingParams.extra_args["steering"]`` (``state``); it touches logits only to force the
  message of a ``refuse`` op on requests whose prompt fired it.
- ``scheduler.SteeringScheduler``: salts steered requests' prefix-cache keys with a hash of their steering, so KV
  blocks computed under one steering are never reused under another (or none); and resolves each distinct config
  against the served model, so one that does not fit it (layer out of range, wrong vector width, missing file)
  finishes alone with ``finish_reason="error"`` instead of reaching the workers (the log names the field); so does
  a steered request on a model without steerable layers (the log names the architecture) or one using a site the
  model's family lacks (the log names family and site).

Bad configs: a malformed one is rejected by the front end (``VLLMValidationError`` offline, HTTP 400 from the
server, naming the field); one that is well formed but does not fit the model finishes with ``"error"`` (HTTP 500
from vLLM's server, which does not pass the engine's reason on; the engine log has it). Either way the engine keeps
serving the other requests. Whether the served model is steerable, and which sites its family has, is decided in the
scheduler: vLLM 0.32's front end asks a logits processor to validate a request's ``SamplingParams`` alone, without
the model.

Model runner: the tracker follows vLLM's V1 model runner (its ``BatchUpdate``). vLLM 0.32 picks the runner from
``VLLM_USE_V2_MODEL_RUNNER`` only and prefers V2 wherever Triton runs, so the plugin sets that variable to 0 in every
vLLM process unless the user set it; nobody has to export anything (``steerlib.vllm.plugin`` says why not V2).

Offline::

    llm = vllm.LLM(model, dtype="float32", **steerlib.vllm.engine_kwargs())
    params = vllm.SamplingParams(max_tokens=64, extra_args=steerlib.vllm.steering_args(cfg))  # cfg: SteeringConfig
    llm.generate(prompts, params)          # one SamplingParams per prompt for per-request steering

Server (vLLM's own OpenAI API; the config travels as a JSON string in ``vllm_xargs``)::

    python -m vllm.entrypoints.openai.api_server --model M \\
        --logits-processors steerlib.vllm.tracker:StepTracker --scheduler-cls steerlib.vllm.scheduler.SteeringScheduler
    # request body: {"prompt": "...", "vllm_xargs": {"steering": "<the config as a JSON string>"}}

Tensor parallelism: every rank builds the same steerable layers, runs its own tracker and applies the same ops to
the (replicated) residual stream, so steering applies on every rank. ``tests/test_vllm_tensor_parallel.py`` checks
it with three CPU ranks against steerlib-on-HF (a rank that skipped the ops would feed its shard another input).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from steerlib.vllm.params import ROOT_ENV, STEERING_KEY, cache_salt, parse_steering, steering_args

TRACKER = "steerlib.vllm.tracker:StepTracker"
SCHEDULER = "steerlib.vllm.scheduler.SteeringScheduler"


def engine_kwargs(
    compilation_config: dict[str, Any] | None = None, steering_root: str | os.PathLike[str] | None = None
) -> dict[str, object]:
    """Keyword arguments for ``vllm.LLM(...)`` / ``EngineArgs(...)`` that switch per-request steering on: the step
    tracker, the steering scheduler and a compilation config under which CUDA graphs cannot freeze steering
    (``compilation_config`` is yours to extend; see ``steerlib.vllm.compilation``). Imports vLLM.

    ``steering_root``: the folder requests may name files in (vectors, SAEs, probes); without one, requests carry
    vectors inline only. It is set as ``$STEERLIB_VLLM_STEERING_ROOT`` in this process, which the engine's processes
    inherit (``steerlib.vllm.params``)."""
    from steerlib.vllm.compilation import compilation_config as graph_safe

    if steering_root is not None:
        os.environ[ROOT_ENV] = str(Path(steering_root).expanduser().resolve())

    return {
        "logits_processors": [TRACKER],
        "scheduler_cls": SCHEDULER,
        "compilation_config": graph_safe(compilation_config),
    }


def serve_args(compilation_config: dict[str, Any] | None = None) -> list[str]:
    """The same as command-line flags for vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``)."""
    from steerlib.vllm.compilation import compilation_config as graph_safe

    compiled = json.dumps(graph_safe(compilation_config), separators=(",", ":"))
    return ["--logits-processors", TRACKER, "--scheduler-cls", SCHEDULER, "--compilation-config", compiled]


__all__ = [
    "ROOT_ENV",
    "SCHEDULER",
    "STEERING_KEY",
    "TRACKER",
    "cache_salt",
    "engine_kwargs",
    "parse_steering",
    "serve_args",
    "steering_args",
]
