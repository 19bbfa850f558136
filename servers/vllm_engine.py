"""The server's engine on vLLM: the same requests and events as :class:`servers.engine.Engine`, run by vLLM's async
engine (continuous batching, tensor parallelism, CUDA graphs) with steerlib's vLLM plugin doing the steering.

Everything in front of the engine is shared with the ``hf`` engine: the same routes, limits, presets and validation
(against the served model's layer count and width, before anything is queued), the same events (text deltas, token
log-probabilities, one final ``Finished`` / ``Failed``). Here each request becomes one ``AsyncLLM.generate`` stream:
its steering travels in ``SamplingParams.extra_args`` (files named by absolute path inside the presets folder, the
steering root the workers accept files from), and which ``refuse`` detector answered comes back through
:mod:`steerlib.vllm.verdicts`. Work that needs the model's activations in this process (feature inspection, the
per-intervention audit record) is the ``hf`` engine's: here it is refused with a clear error.

vLLM is imported when the engine starts, so this module imports without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from servers.activations import Captured, merge_captures
from servers.engine import EngineLimits, EngineStatus
from servers.errors import ApiError, queue_full, shutting_down
from servers.jobs import Failed, Finished, GenRequest, Job
from servers.logprobs import LOGPROB_FLOOR, TokenLogprob
from servers.metrics import Metrics
from servers.resources import ServerResources
from steerlib.sites import tl_name
from steerlib.vllm import capture, verdicts

log = logging.getLogger(__name__)

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled", "error": "error"}
"""vLLM's finish reasons as the server's (``Finished.finish_reason``)."""


SERVER_OWNED = ("logits_processors", "scheduler_cls", "model", "dtype", "tensor_parallel_size")
"""Engine arguments the server sets itself: from its own settings, or as steering needs them."""


@dataclass(frozen=True)
class VllmLaunch:
    """How to start vLLM: the model as vLLM names it (a folder or hub id) and its engine arguments."""

    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    steering_root: Path | None = None
    """The presets folder: the only place requests' files may be loaded from."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """More ``AsyncEngineArgs`` fields (``max_model_len``, ``gpu_memory_utilization``, ``enforce_eager``, ...)."""
    max_num_seqs: int = 16

    def engine_args(self) -> Any:
        """vLLM's ``AsyncEngineArgs``; an unknown or steering-owned field is a ``ValueError`` naming it."""
        import dataclasses

        for key in self.extra:
            if key in SERVER_OWNED:
                raise ValueError(f"vllm_args: {key!r} is set by the server (use its own setting, if any)")
        from vllm.engine.arg_utils import AsyncEngineArgs

        import steerlib.vllm

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        for key in self.extra:
            if key not in known:
                raise ValueError(f"vllm_args: {key!r} is not one of vLLM's engine arguments")
        owned = steerlib.vllm.engine_kwargs(
            compilation_config=self.extra.get("compilation_config"), steering_root=self.steering_root
        )
        kwargs = {"max_num_seqs": self.max_num_seqs, "disable_log_stats": True, **self.extra, **owned}
        return AsyncEngineArgs(
            model=self.model, dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_size, **kwargs
        )


class VllmEngine:
    """Runs generation on vLLM's ``AsyncLLM``; the client side (``submit``, ``shutdown``, ``status``) is
    :class:`servers.engine.Engine`'s."""

    def __init__(self, launch: VllmLaunch, limits: EngineLimits, metrics: Metrics, resources: ServerResources):
        self.launch, self.limits, self.metrics, self.resources = launch, limits, metrics, resources
        self._llm: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._stopped = False
        self._verdicts = Path(tempfile.mkdtemp(prefix="steerlib-verdicts-"))

    def start(self) -> None:
        """Start vLLM (its engine processes inherit the verdicts folder). Call inside the server's event loop."""
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ[verdicts.VERDICTS_ENV] = str(self._verdicts)
        self._llm = AsyncLLM.from_engine_args(self.launch.engine_args())

    @property
    def in_flight(self) -> int:
        """Requests started and not yet finished (running in vLLM or waiting in its scheduler)."""
        return len(self._tasks)

    @property
    def queue_depth(self) -> int:
        """Requests vLLM holds that it is not running yet (continuous batching runs up to ``max_batch``)."""
        return max(0, self.in_flight - self.limits.max_batch)

    @property
    def status(self) -> EngineStatus:
        if self._llm is None:
            return "stopped" if self._stopped else "not started"
        if self._stopped:
            return "stopped"
        if self._llm.errored:
            return "dead"
        return "shutting down" if self._closed else "ok"

    # -- client side -----------------------------------------------------------------------------------------

    def submit(self, item: GenRequest | Job) -> None:
        """Start a request (429 beyond ``max_batch + max_queue`` in flight, 503 once shutting down or dead)."""
        if isinstance(item, Job):
            raise ApiError(
                501,
                "this needs the model's activations in the server process: run the server with --engine hf",
                type="invalid_request_error",
                code="needs_hf_engine",
            )
        if item.audit:
            raise ApiError(
                400,
                "steering_audit: the per-intervention audit record needs --engine hf; this server runs vllm",
                param="steering_audit",
                code="needs_hf_engine",
            )
        if self._closed or self.status != "ok":
            raise shutting_down()
        if self.in_flight >= self.limits.max_batch + self.limits.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise queue_full(self.limits.max_queue)
        task = item.loop.create_task(self._run(item))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        self.metrics.queue_depth.set(self.queue_depth)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.metrics.queue_depth.set(self.queue_depth)

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new work, let running requests finish for ``grace_s``, then abort the rest and stop vLLM."""
        self._closed = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            if pending:
                log.warning("shutdown: cancelling %d running requests", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=30)
        if self._llm is not None:
            self._llm.shutdown()
        self._stopped = True
        shutil.rmtree(self._verdicts, ignore_errors=True)

    # -- one request -----------------------------------------------------------------------------------------

    async def _run(self, req: GenRequest) -> None:
        rid, tag = uuid.uuid4().hex, verdicts.new_tag()
        stream = _Stream(req)
        watcher = asyncio.create_task(_abort_when_cancelled(self._llm, req, rid))
        try:
            prompt = {"prompt_token_ids": list(req.prompt_ids)}
            async for out in self._llm.generate(prompt, self._params(req, tag), rid):
                stream.take(out)
            acts = self._activations(req, tag) if req.capture else None
            req.emit(stream.finished(verdicts.take(self._verdicts, tag), activations=acts))
        except asyncio.CancelledError:  # shutdown after the grace period
            req.emit(stream.finished(None, reason="cancelled"))
        except Exception as e:  # vLLM refused it (front-end check) or the engine failed: this request only
            log.exception("request %s failed in vLLM", rid)
            status = 400 if type(e).__name__ in ("VLLMValidationError", "ValueError") else 500
            req.emit(Failed(status, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            watcher.cancel()
            verdicts.take(self._verdicts, tag)
            capture.take(self._verdicts, tag)  # a cancelled or failed request's file goes too

    def _activations(self, req: GenRequest, tag: str) -> dict[str, tuple[Tensor, Tensor]]:
        """What the workers wrote for the request, per site, merged in position order."""
        chunks = capture.take(self._verdicts, tag)
        return {name: merge_captures(chunks.get(name, [])) for name in (tl_name(*site) for site in req.capture)}

    def _params(self, req: GenRequest, tag: str) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        import steerlib.vllm

        p = req.params
        extra: dict[str, Any] = {}
        if req.steering is not None:
            extra |= steerlib.vllm.steering_args(req.steering)
        if req.capture:
            extra[capture.CAPTURE_KEY] = [list(site) for site in req.capture]
        if extra:
            extra[verdicts.TAG_KEY] = tag
        return SamplingParams(
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed if p.temperature > 0 else None,
            max_tokens=p.max_tokens,
            stop=list(p.stop) or None,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            logprobs=p.logprobs,
            prompt_logprobs=p.logprobs if p.echo_logprobs else None,
            output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
            extra_args=extra or None,
        )


CANCEL_POLL_S = 0.25
"""How often a running request checks whether its client left or its time ran out."""


async def _abort_when_cancelled(llm: Any, req: GenRequest, rid: str) -> None:
    """The client left or timed out (``req.cancelled``, a thread event the HTTP side sets): stop it in vLLM.
    Polled: a thread blocked per request on the event would exhaust the loop's default executor."""
    while not req.cancelled.is_set():
        await asyncio.sleep(CANCEL_POLL_S)
    await llm.abort(rid)


@dataclass
class _Stream:
    """One request's outputs from vLLM, passed on as the server's events."""

    req: GenRequest
    text: str = ""
    n_tokens: int = 0
    reason: str | None = None
    stop_reason: Any = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    def take(self, out: Any) -> None:
        if out.prompt_logprobs is not None and not self.prompt_logprobs:
            self.prompt_logprobs = _prompt_entries(self.req.prompt_ids, out.prompt_logprobs, self.req.params.logprobs)
        c = out.outputs[0]
        if c.logprobs is not None:
            for token, entries in zip(c.token_ids, c.logprobs, strict=True):
                entry = _entry(token, entries, self.req.params.logprobs or 0)
                self.logprobs.append(entry)
                self.req.emit(entry)
        self.n_tokens += len(c.token_ids)
        if c.text:
            self.text += c.text
            self.req.emit(c.text)
        if c.finish_reason is not None:
            self.reason, self.stop_reason = c.finish_reason, c.stop_reason

    def finished(
        self, refused_by: str | None, reason: str | None = None, activations: Captured | None = None
    ) -> Finished:
        why = reason or FINISH_REASONS.get(self.reason or "", "error")
        error = None
        if why == "error":
            error = (
                "the engine refused this request: its steering, or the sites it reads, do not fit the served model "
                "(the server log names the field)"
            )
        return Finished(
            self.text,
            why,
            len(self.req.prompt_ids),
            self.n_tokens,
            refused_by=refused_by,
            error=error,
            logprobs=tuple(self.logprobs),
            prompt_logprobs=tuple(self.prompt_logprobs),
            activations=activations,
        )


def model_source(name: str | None) -> str:
    """What vLLM loads for the server's ``model`` setting: the embedded model's converted folder, a GGUF file's
    converted folder, or the folder / hub id as given. A PEFT adapter folder is an error (vLLM serves merged
    weights; ``--engine hf`` merges the adapter on load)."""
    from steerlib.hf.loading import embedded_model_folder, gguf_model_folder

    if name is None:
        return str(embedded_model_folder())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return str(gguf_model_folder(path))
    if (path / "adapter_config.json").is_file():
        raise ValueError(f"model: {name} is a PEFT adapter; --engine vllm serves full weights (merge it first)")
    return name


def skeleton(source: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for the server's front end when vLLM runs the model: the model built from its config
    on the ``meta`` device (its layers and width are what requests are validated against; no weights are loaded,
    no forward can run) and its tokenizer, prepared as ``steerlib.load_model`` prepares it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from steerlib.hf.loading import prepare_tokenizer

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    prepare_tokenizer(tokenizer, model)
    return model.eval(), tokenizer


def _entry(token: int, entries: Mapping[int, Any], top: int) -> TokenLogprob:
    """One position's vLLM ``{token: Logprob}`` as the server's entry: the chosen token and the ``top`` most likely."""
    best = sorted(entries.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
    alternatives = tuple((int(t), _floor(lp.logprob)) for t, lp in best if lp.rank is not None and lp.rank <= top)
    return TokenLogprob(int(token), _floor(entries[token].logprob), alternatives)


def _prompt_entries(prompt_ids: Sequence[int], entries: Sequence[Any], top: int | None) -> list[TokenLogprob]:
    out = [TokenLogprob(prompt_ids[0], None, None)]
    for token, e in zip(prompt_ids[1:], entries[1:], strict=True):
        out.append(_entry(token, e, top or 0))
    return out


def _floor(x: float) -> float:
    return max(float(x), LOGPROB_FLOOR)
