"""The path of one generation request, shared by chat and text completions: check limits, resolve steering,
queue, then collect the result (with a deadline) or stream it as server-sent events."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from servers.audit_trail import AuditTrail
from servers.errors import ApiError, bad_request, error_body
from servers.jobs import Event, Failed, Finished, GenRequest, Job
from servers.logprobs import TokenLogprob
from servers.sampling import SamplingParams
from servers.schemas import CompletionRequest, SamplingRequest, unsupported
from servers.state import ServerState
from servers.steering import Resolved

T = TypeVar("T")
_DISCONNECT_POLL_S = 0.25
ChunkFn = Callable[[str | None, str | None, Sequence[TokenLogprob]], dict[str, Any]]
"""(text delta or None, finish_reason or None, the log-probabilities of the tokens since the last chunk) -> one chunk
object."""


def check_request(st: ServerState, body: SamplingRequest) -> None:
    if body.model != st.model_name:
        raise ApiError(
            404,
            f"model {body.model!r} not found; this server serves {st.model_name!r}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    problem = unsupported(body)
    if problem is not None:
        raise bad_request(problem[1], problem[0])


PROBE_CHARS_PER_TOKEN = 16
"""A prompt longer than ``max_prompt_tokens`` times this many characters is first tokenized in part."""


def tokenize_bounded(st: ServerState, text: str, **kwargs: Any) -> list[int]:
    """``text``'s token ids, at a cost bounded by the prompt limit rather than by the text (see :func:`over_limit`)."""
    limit = st.settings.max_prompt_tokens
    if over_limit(st.tokenizer, text, limit, **kwargs):
        raise bad_request(f"prompt has more than {limit} tokens; this server's limit is {limit}", "messages")
    return list(st.tokenizer(text, **kwargs)["input_ids"])


def over_limit(tokenizer: Any, text: str, limit: int, **kwargs: Any) -> bool:
    """True when ``text`` certainly has more than ``limit`` tokens, found by tokenizing at most
    ``PROBE_CHARS_PER_TOKEN`` characters per allowed token (a prefix has at most one token more than the text it
    starts); False means: tokenize it and count."""
    probe = limit * PROBE_CHARS_PER_TOKEN
    return len(text) > probe and len(tokenizer(text[:probe], **kwargs)["input_ids"]) > limit + 1


def sampling_params(st: ServerState, body: SamplingRequest, max_tokens: int | None, n_prompt: int) -> SamplingParams:
    s = st.settings
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise bad_request(f"max_tokens {max_tokens} exceeds this server's limit {s.max_tokens_limit}", "max_tokens")
    n_new = max_tokens if max_tokens is not None else min(s.default_max_tokens, s.max_tokens_limit)
    if n_prompt > s.max_prompt_tokens:
        raise bad_request(f"prompt has {n_prompt} tokens; this server's limit is {s.max_prompt_tokens}", "messages")
    if n_prompt == 0:
        raise bad_request("the prompt is empty (0 tokens)")
    if st.max_positions is not None and n_prompt + n_new > st.max_positions:
        raise bad_request(
            f"prompt ({n_prompt} tokens) + max_tokens ({n_new}) exceeds the model's context of {st.max_positions}",
            "max_tokens",
        )
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    stop = tuple(x for x in body.stop_list() if x)
    if len(stop) > 4:
        raise bad_request("stop: at most 4 stop sequences", "stop")
    long = [len(x) for x in stop if len(x) > s.max_stop_chars]
    if long:
        raise bad_request(f"stop: a sequence of {long[0]} characters; at most {s.max_stop_chars}", "stop")
    top, echo = logprob_params(st, body)
    return SamplingParams(
        temperature,
        top_p,
        body.seed,
        n_new,
        stop,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logprobs=top,
        echo_logprobs=echo,
    )


def logprob_params(st: ServerState, body: SamplingRequest) -> tuple[int | None, bool]:
    """(alternatives per token or None, whether to score the echoed prompt); 400 beyond ``max_top_logprobs``."""
    top, field = body.top_logprobs_asked()
    limit = st.settings.max_top_logprobs
    if top is not None and top > limit:
        raise bad_request(f"{field}: {top} alternatives per token; this server's limit is {limit}", field)
    echo = isinstance(body, CompletionRequest) and bool(body.echo) and top is not None
    return top, echo


async def submit(
    st: ServerState,
    prompt_ids: list[int],
    resolved: Resolved,
    params: SamplingParams,
    audit: bool = False,
    capture: tuple[tuple[int, str], ...] = (),
    stream: bool = True,
) -> GenRequest:
    loop = asyncio.get_running_loop()
    req = GenRequest(prompt_ids, resolved.config, params, loop, resolved.cost, resolved.sources, audit, capture, stream)
    st.engine.submit(req)
    st.metrics.prompt_tokens.inc(len(prompt_ids))
    if resolved.config is not None:
        st.metrics.steered.inc()
    return req


async def run_job(st: ServerState, fn: Callable[[], T], http: Request) -> T:
    """Run ``fn`` on the engine thread between batches: it waits in the queue (429 when full), times out (408) and
    stops when the client hangs up, as a generation request does."""
    job = Job(fn)
    st.engine.submit(job)
    watcher = asyncio.create_task(_cancel_on_disconnect(http, job.cancelled))
    try:
        result: T = await asyncio.wait_for(asyncio.wrap_future(job.future), st.settings.request_timeout_s)
        return result
    except asyncio.TimeoutError:
        job.cancelled.set()
        raise ApiError(408, f"request timed out after {st.settings.request_timeout_s:g} s", type="timeout") from None
    finally:
        job.cancelled.set()  # a no-op once it finished; stops it if this handler itself was cancelled
        watcher.cancel()


async def collect(st: ServerState, req: GenRequest, http: Request, trail: AuditTrail | None = None) -> Finished:
    """Wait for the request to finish (ApiError 408 after the timeout, 503 if cancelled by shutdown); its audit
    record goes to ``trail`` first, error finishes included.

    A client that hangs up stops its row: nobody would read the answer.
    """
    watcher = asyncio.create_task(_cancel_on_disconnect(http, req.cancelled))
    try:
        return await _wait(st, req, trail)
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(http: Request, cancelled: threading.Event) -> None:
    while not cancelled.is_set():
        if await http.is_disconnected():
            cancelled.set()
            return
        await asyncio.sleep(_DISCONNECT_POLL_S)


async def _wait(st: ServerState, req: GenRequest, trail: AuditTrail | None) -> Finished:
    try:
        return await asyncio.wait_for(_final(st, req, trail), st.settings.request_timeout_s)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        req.cancelled.set()
        raise ApiError(408, f"request timed out after {st.settings.request_timeout_s:g} s", type="timeout") from None


async def _final(st: ServerState, req: GenRequest, trail: AuditTrail | None) -> Finished:
    async for event in req.events():
        if isinstance(event, Failed):
            raise ApiError(event.status, event.message, type="server_error")
        if isinstance(event, Finished):
            if trail is not None and event.finish_reason != "cancelled":
                await trail.finish(event)
            return _finished(st, event, req.steering is not None)
    raise ApiError(500, "generation ended without a result", type="server_error")


def _finished(st: ServerState, fin: Finished, steered: bool) -> Finished:
    if fin.finish_reason == "cancelled":
        raise ApiError(503, "the request was cancelled (server shutting down)", type="server_error")
    st.metrics.completion_tokens.inc(fin.completion_tokens)
    if fin.finish_reason == "error":
        raise row_error(fin, steered)
    return fin


def row_error(fin: Finished, steered: bool) -> ApiError:
    """A row that failed alone (its neighbours finished): the request's fault when it was steered (400), else the
    model's (500). Non-streaming clients get it as an error, never as a partial answer."""
    message = fin.error or "generation failed"
    if steered:
        return ApiError(400, message, param="steering", code="non_finite")
    return ApiError(500, message, type="server_error", code="non_finite")


async def stream(
    st: ServerState,
    req: GenRequest,
    chunk: ChunkFn,
    usage_chunk: ChunkFn | None,
    trail: AuditTrail | None = None,
    extras: Callable[[Finished], dict[str, Any]] | None = None,
) -> AsyncIterator[str]:
    """SSE lines: one chunk per text delta, a final chunk with the finish reason (and ``extras``: the audit record
    and the activations read, when asked for), optional usage, ``[DONE]``."""
    deadline = time.monotonic() + st.settings.request_timeout_s
    events = req.events()
    pending: list[TokenLogprob] = []  # tokens chosen whose text has not been sent yet
    yield _sse(chunk("", None, ()))
    while True:
        try:
            event: Event = await asyncio.wait_for(anext(events), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            req.cancelled.set()
            yield _sse(error_body(f"request timed out after {st.settings.request_timeout_s:g} s", "timeout"))
            break
        if isinstance(event, TokenLogprob):
            pending.append(event)
            continue
        if isinstance(event, str):
            yield _sse(chunk(event, None, pending))
            pending = []
            continue
        if isinstance(event, Failed):
            yield _sse(error_body(event.message, "server_error"))
            break
        if event.finish_reason == "cancelled":
            yield _sse(error_body("the request was cancelled (server shutting down)", "server_error"))
            break
        st.metrics.completion_tokens.inc(event.completion_tokens)
        final = chunk(None, event.finish_reason, pending)
        if trail is not None:
            await trail.finish(event)
        if extras is not None:
            final |= await asyncio.to_thread(extras, event)
        yield _sse(final)
        if event.finish_reason == "error":
            yield _sse(row_error(event, req.steering is not None).body())
        if usage_chunk is not None:
            yield _sse(usage_chunk(None, None, ()) | {"usage": usage(event)})
        break
    yield "data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage(fin: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
