"""vLLM's scheduler with steering-aware prefix caching (``scheduler_cls=steerlib.vllm.scheduler.SteeringScheduler``).

vLLM keys cached KV blocks by their tokens and a per-request ``cache_salt`` (folded into the first block's hash, so
it reaches every later block). Before a steered request is queued its salt is replaced by one derived from its
steering (``steerlib.vllm.params.cache_salt``) and its block hashes recomputed: steered and unsteered requests,
or two different steerings, never share a block. Runs in vLLM's engine-core process. ``SteeringAsyncScheduler``
is the same over vLLM's asynchronous scheduler (GPU engines with async scheduling on).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from steerlib.vllm.params import cache_salt, parse_steering


def salt_request(request: Any) -> None:
    """Key a steered request's prefix-cache blocks by its steering (unsteered requests are left as they are)."""
    params = request.sampling_params
    cfg = parse_steering(None if params is None else params.extra_args)
    if cfg is not None:
        request.cache_salt = cache_salt(cfg, request.request_id, request.cache_salt)
        request.block_hashes = []
        request.update_block_hashes()


class SteeringScheduler(Scheduler):
    """``Scheduler`` whose ``add_request`` salts steered requests' prefix-cache keys."""

    def add_request(self, request: Any) -> None:
        salt_request(request)
        super().add_request(request)


class SteeringAsyncScheduler(AsyncScheduler):
    """``AsyncScheduler`` whose ``add_request`` salts steered requests' prefix-cache keys."""

    def add_request(self, request: Any) -> None:
        salt_request(request)
        super().add_request(request)
