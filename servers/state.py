"""Everything a request handler needs, built once per app: settings, model facts, presets, steering, engine."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from fastapi import Request
from torch import nn

from servers.audit import AuditLog
from servers.engine import Engine, EngineLimits
from servers.keys import KeyPolicy
from servers.limits import RequestLimits
from servers.metrics import Metrics
from servers.registry import PresetRegistry
from servers.resources import ServerResources
from servers.settings import ServerSettings
from servers.steering import SteeringResolver
from servers.vllm_engine import VllmEngine, VllmLaunch
from steerlib.devices import resolve_device, resolve_dtype
from steerlib.extract.activations import pad_id_of
from steerlib.hf.layout import get_layout
from steerlib.hf.loading import checkpoint_dtype
from steerlib.plan import spec_of
from steerlib.sae import Sae


@dataclass
class ServerState:
    settings: ServerSettings
    model: nn.Module
    tokenizer: Any
    model_name: str
    registry: PresetRegistry
    resolver: SteeringResolver
    engine: Engine | VllmEngine
    metrics: Metrics
    max_positions: int | None
    vocab_size: int
    keys: KeyPolicy | None = None
    audit_log: AuditLog | None = None

    def sae(self, name: str) -> Sae:
        """A preset SAE by name, loaded once onto the model's device: the same copy steering uses."""
        return self.engine.resources.sae(Path(self.registry.sae(name)))


def build_state(
    settings: ServerSettings,
    model: nn.Module,
    tokenizer: Any,
    model_name: str,
    registry: PresetRegistry | None = None,
) -> ServerState:
    """The server's state; ``registry`` defaults to the presets of ``settings.presets``."""
    layout = get_layout(model)
    registry = registry if registry is not None else PresetRegistry(settings.presets)
    spec = spec_of(model, layout.n_layers, layout.d_model)
    if spec.device.type == "meta":  # vLLM runs the model; validation loads vectors and SAEs on the host
        spec = replace(spec, device=torch.device("cpu"), dtype=torch.float32)
    resources = ServerResources(spec)
    resolver = SteeringResolver(
        registry, spec, tokenizer, settings.default_presets, RequestLimits.of(settings), resources
    )
    metrics = Metrics()
    limits = EngineLimits(
        settings.max_batch, settings.max_queue, settings.batch_wait_ms / 1000, settings.max_batch_cost
    )
    engine: Engine | VllmEngine
    if settings.engine == "vllm":
        engine = VllmEngine(launch_of(settings, model, registry.root), limits, metrics, resources)
    else:
        engine = Engine(model, tokenizer, eos_ids(model, tokenizer), pad_id_of(tokenizer), limits, metrics, resources)
    config = getattr(model, "config", None)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    vocab = int(getattr(config, "vocab_size", 0) or len(tokenizer))
    keys = KeyPolicy.load(settings.key_policy) if settings.key_policy is not None else None
    audit = AuditLog(settings.audit_log) if settings.audit_log is not None else None
    vocab = min(vocab, len(tokenizer))
    return ServerState(
        settings, model, tokenizer, model_name, registry, resolver, engine, metrics, max_pos, vocab, keys, audit
    )


def launch_of(settings: ServerSettings, model: nn.Module, presets: Path | None) -> VllmLaunch:
    """How vLLM starts for ``settings``: the model ``model`` was built from, steered from the presets folder, in the
    dtype ``auto`` means on the hf engine too (``steerlib.devices.resolve_dtype``: the checkpoint's where the
    hardware runs it fast, else float32; vLLM's own ``auto`` would halve a float32 checkpoint)."""
    dtype: str = settings.dtype
    if dtype == "auto":
        own = checkpoint_dtype(model.config)
        dtype = str(resolve_dtype("auto", resolve_device("auto"), own)).removeprefix("torch.")
    return VllmLaunch(
        str(model.name_or_path),
        dtype,
        settings.tensor_parallel_size,
        presets,
        settings.vllm_args,
        settings.max_batch,
    )


def eos_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (which may list several)."""
    ids: set[int] = set()
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    configured = getattr(gen, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    return frozenset(ids)


def state_of(request: Request) -> ServerState:
    st: ServerState = request.app.state.steerlib
    return st
