"""vLLM's scheduler with steering-aware prefix caching and model checks (``scheduler_cls=...SteeringScheduler``).

Runs in vLLM's engine-core process, where every request passes before it is scheduled. Two jobs:

- **Prefix caching.** vLLM keys cached KV blocks by their tokens and a per-request ``cache_salt`` (folded into the
  first block's hash, so it reaches every later block). A steered request's salt is replaced by one derived from
  its steering (``steerlib.vllm.params.cache_salt``) and its block hashes recomputed: steered and unsteered
  requests, or two different steerings, never share a block.
- **Checks against the served model.** The front end (``StepTracker.validate_params``) rejects malformed configs
  but does not know the model; a layer out of range, a vector of the wrong width or an SAE for another model is
  found here, by resolving the config against the model as the workers will. Such a request is never scheduled:
  it finishes at once with ``finish_reason="error"`` (vLLM's OpenAI server answers it with an error, the log names
  the field) and the engine goes on serving the others. Verdicts are kept per distinct config.
- **Steerable model.** On a model without steerable layers (an architecture outside ``steerlib.vllm.families``, or
  the plugin switched off or not loaded) every steered request is refused the same way, naming the architecture;
  a config using a site the served family lacks (``attn_out`` on a mixture-of-experts model) is refused naming the
  family and the site. Unsteered requests are served as usual.
- **CUDA graphs.** On an engine whose compilation config would replay steering frozen (full CUDA graphs, or
  piecewise graphs not split at the site op: see ``steerlib.vllm.compilation``), every steered request is refused
  the same way, naming the fix: never served unsteered.

``SteeringAsyncScheduler`` is the same over vLLM's asynchronous scheduler (GPU engines with async scheduling on).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import RequestStatus

from steerlib.config import SteeringConfig
from steerlib.plan import ModelSpec, Resources, build_plan
from steerlib.vllm import capture
from steerlib.vllm.compilation import unsafe_reason
from steerlib.vllm.families import STEERABLE_PREFIX, Family, steerable_architectures
from steerlib.vllm.params import cache_salt, config_key, parse_steering
from steerlib.vllm.plugin import DISABLE_ENV, disabled
from steerlib.vllm.served import model_spec, tokenizer_loader

log = logging.getLogger(__name__)

MAX_VERDICTS = 1024
"""Distinct configs whose check result is remembered (a config is resolved once, not once per request)."""


def salt_request(request: Any) -> tuple[SteeringConfig | None, tuple[tuple[int, str], ...]]:
    """Key a steered request's prefix-cache blocks by its steering, and give a request that reads activations blocks
    of its own (every prompt token must run through the model to be read); returns its config (None: unsteered)
    and the sites it reads."""
    extra = None if request.sampling_params is None else request.sampling_params.extra_args
    cfg, reads = parse_steering(extra), capture.sites_of(extra)
    if cfg is None and not reads:
        return None, ()
    salt = request.cache_salt if cfg is None else cache_salt(cfg, request.request_id, request.cache_salt)
    if reads:
        salt = f"{salt or ''}|steerlib-read:{request.request_id}"
    request.cache_salt = salt
    request.block_hashes = []
    request.update_block_hashes()
    return cfg, reads


def served_family(vllm_config: Any) -> tuple[Family | None, str | None]:
    """The served model's family, or (None, why its requests cannot be steered)."""
    from vllm.model_executor.models import registry

    mc = vllm_config.model_config
    arch = mc.architecture
    if disabled():
        return None, f"steering is switched off in this vLLM ({DISABLE_ENV} is set), so {arch} has no steerable layers"
    known = steerable_architectures(registry._TEXT_GENERATION_MODELS)
    if arch not in known:
        return None, f"architecture {arch} has no steerable layers in vLLM; steerable: {', '.join(sorted(known))}"
    built = getattr(getattr(mc, "_model_info", None), "architecture", STEERABLE_PREFIX)
    if not built.startswith(STEERABLE_PREFIX):
        return None, f"vLLM builds {built} for architecture {arch}, not a steerable class: is steerlib's plugin loaded?"
    return known[arch][1], None


class ModelCheck:
    """Resolves configs against the served model (on the CPU, then dropped) and remembers the verdicts."""

    def __init__(self, spec: ModelSpec, load_tokenizer: Callable[[], Any], family: Family | None = None) -> None:
        self.spec = spec
        self.family = family
        self.load_tokenizer = load_tokenizer
        self.tokenizer: Any = None
        self.verdicts: OrderedDict[str, str | None] = OrderedDict()
        self.resources = Resources(spec)
        """Files loaded once: requests name only files under the operator's steering root (params.confine)."""

    def error(self, cfg: SteeringConfig) -> str | None:
        """Why ``cfg`` cannot steer this model (the message names the field), or None if it can."""
        key = config_key(cfg)
        if key not in self.verdicts:
            try:
                if self.tokenizer is None:  # token matching resolves against the vocabulary
                    self.tokenizer = self.load_tokenizer()
                plan = build_plan(cfg, self.spec, self.tokenizer, self.resources)
                if self.family is not None:
                    self.family.check(site for _, site in plan.ops)
                self.verdicts[key] = None
            except Exception as e:  # any failure to resolve (bad field, unreadable file) rejects the config
                self.verdicts[key] = f"{type(e).__name__}: {e}"
            if len(self.verdicts) > MAX_VERDICTS:
                self.verdicts.popitem(last=False)
        self.verdicts.move_to_end(key)
        return self.verdicts[key]

    def read_error(self, reads: tuple[tuple[int, str], ...], extra_args: Any) -> str | None:
        """Why this model cannot hand back the activations a request reads at ``reads``, or None."""
        if not capture.writable(extra_args):
            return "activations are handed back only to a server that owns the engine (python -m servers)"
        bad = [layer for layer, _ in reads if layer >= self.spec.n_layers]
        if bad:
            return f"layer {bad[0]} out of range: model has {self.spec.n_layers} layers (0..{self.spec.n_layers - 1})"
        if self.family is not None:
            try:
                self.family.check(site for _, site in reads)
            except ValueError as e:
                return str(e)
        return None


class _SteeringMixin:
    """``add_request`` salts and checks; a request that fails the check is finished with an error, unscheduled."""

    vllm_config: Any

    def _steering_init(self) -> None:
        family, not_steerable = served_family(self.vllm_config)
        spec = model_spec(self.vllm_config, torch.device("cpu"))
        self._check = ModelCheck(spec, tokenizer_loader(self.vllm_config), family)
        self._unsafe = not_steerable or unsafe_reason(self.vllm_config.compilation_config)
        self._failed: dict[str, str] = {}
        self._rejected: list[Any] = []

    def add_request(self, request: Any) -> None:
        try:
            cfg, reads = salt_request(request)
            err = None if cfg is None else self._unsafe or self._check.error(cfg)
            if err is None and reads:
                err = self._unsafe or self._check.read_error(reads, request.sampling_params.extra_args)
        except ValueError as e:  # only reached when the front end's validation was bypassed
            err = str(e)
        super().add_request(request)  # type: ignore[misc]
        if err is not None:
            log.error("steerlib: request %s rejected, its steering cannot run here: %s", request.request_id, err)
            self._failed[request.request_id] = err

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self._failed:
            ids = list(self._failed)
            self._failed.clear()
            self._rejected += self.finish_requests(ids, RequestStatus.FINISHED_ERROR)  # type: ignore[attr-defined]
        return super().schedule(*args, **kwargs)  # type: ignore[misc]

    def update_from_output(self, *args: Any, **kwargs: Any) -> dict[int, EngineCoreOutputs]:
        outputs: dict[int, EngineCoreOutputs] = super().update_from_output(*args, **kwargs)  # type: ignore[misc]
        for request in self._rejected:
            out = outputs.setdefault(request.client_index, EngineCoreOutputs())
            reason = request.get_finished_reason()
            out.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[], finish_reason=reason))
        self._rejected = []
        return outputs


class SteeringScheduler(_SteeringMixin, Scheduler):
    """vLLM's ``Scheduler`` with steering-keyed prefix caching and model checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steering_init()


class SteeringAsyncScheduler(_SteeringMixin, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` with steering-keyed prefix caching and model checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steering_init()
