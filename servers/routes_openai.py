"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from servers.activations import Readout, plan_readout, readout_body
from servers.audit_trail import AuditTrail
from servers.errors import bad_request
from servers.features import known_sae, response_features
from servers.jobs import Finished, GenRequest
from servers.keys import check_steering, key_rule
from servers.logprobs import LogprobFormatter, TokenLogprob
from servers.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from servers.serving import (
    ChunkFn,
    check_request,
    collect,
    new_id,
    sampling_params,
    stream,
    submit,
    tokenize_bounded,
    usage,
)
from servers.state import ServerState, state_of

router = APIRouter(prefix="/v1")


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    st = state_of(request)
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": 0, "owned_by": "steerlib"}]}


@dataclass(frozen=True)
class _Started:
    req: GenRequest
    trail: AuditTrail
    rid: str
    created: int
    readout: Readout | None = None

    def extras(self, st: ServerState, fin: Finished) -> dict[str, Any]:
        """What the response carries beside the answer: the audit record and the activations read, if asked."""
        out = {} if self.trail.response is None else {"steering_audit": self.trail.response}
        if self.readout is not None and fin.activations is not None:
            n_prompt = len(self.req.prompt_ids)
            out["steering_activations"] = readout_body(self.readout, fin.activations, n_prompt, st.engine.resources)
        return out


async def _start(
    st: ServerState, http: Request, body: SamplingRequest, prompt: tuple[str, list[int]], max_tokens: int | None
) -> _Started:
    """Check, resolve and queue one generation request (everything that can refuse it happens before queueing)."""
    text, prompt_ids = prompt
    params = sampling_params(st, body, max_tokens, len(prompt_ids))
    rule = key_rule(http)
    check_steering(rule, body.steering, st.resolver.defaults)
    resolved = await asyncio.to_thread(st.resolver.resolve_all, body.steering)
    chat = isinstance(body, ChatCompletionRequest)
    rid = new_id("chatcmpl" if chat else "cmpl")
    endpoint = "chat.completions" if chat else "completions"
    trail = AuditTrail(st, rule.name, endpoint, rid, resolved, bool(body.steering_audit), text)
    if isinstance(body, ChatCompletionRequest) and body.return_features is not None:
        known_sae(st, body.return_features.sae)  # an unknown SAE is a 400 before generating
    readout = None
    if body.return_activations is not None:
        res = st.engine.resources
        readout = await asyncio.to_thread(
            plan_readout, body.return_activations, st.registry, res, res.spec.n_layers,
            len(prompt_ids) + params.max_tokens, st.settings.max_activation_floats,
        )  # fmt: skip
    sites = () if readout is None else readout.sites
    req = await submit(st, prompt_ids, resolved, params, trail.needed, sites, bool(body.stream))
    return _Started(req, trail, rid, int(time.time()), readout)


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    st = state_of(request)
    check_request(st, body)
    prompt = await asyncio.to_thread(chat_prompt, st, body)  # tokenizing a long prompt takes a while
    go = await _start(st, request, body, prompt, body.max_completion_tokens or body.max_tokens)
    fmt = LogprobFormatter(st.tokenizer)

    def chunk(delta: str | None, finish: str | None, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
        d = {} if delta is None else {"content": delta} if delta else {"role": "assistant", "content": ""}
        logprobs = {"content": fmt.chat(lps), "refusal": None} if body.logprobs and (lps or finish) else None
        choice = {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}
        choices = [] if delta is None and finish is None else [choice]
        return _head(st, go, "chat.completion.chunk") | {"choices": choices}

    if body.stream:
        return _streamed(st, go, body, chunk)
    fin = await collect(st, go.req, request, go.trail)
    out = _chat_response(st, go, fin) | await asyncio.to_thread(go.extras, st, fin)
    if body.logprobs:
        content = await asyncio.to_thread(fmt.chat, fin.logprobs)
        out["choices"][0]["logprobs"] = {"content": content, "refusal": None}
    if body.return_features is not None:
        out["steering_features"] = await response_features(
            st, body.return_features, prompt[0], fin.text, go.req.steering, request
        )
    return JSONResponse(out)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    st = state_of(request)
    check_request(st, body)
    prompt_ids = await asyncio.to_thread(completion_prompt_ids, st, body.prompt)
    text = prompt_text(st, body.prompt, prompt_ids)
    go = await _start(st, request, body, (text, prompt_ids), body.max_tokens if body.max_tokens is not None else 16)
    fmt = LogprobFormatter(st.tokenizer)

    def chunk(delta: str | None, finish: str | None, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
        logprobs = fmt.legacy(lps) if body.logprobs is not None and (lps or finish) else None
        choices = (
            []
            if delta is None and finish is None
            else [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}]
        )
        return _head(st, go, "text_completion") | {"choices": choices}

    if body.stream:
        return _streamed(st, go, body, chunk)
    fin = await collect(st, go.req, request, go.trail)
    logprobs = None
    if body.logprobs is not None:
        logprobs = await asyncio.to_thread(_legacy_logprobs, fmt, fin)
    answer = text + fin.text if body.echo else fin.text
    choice = {"index": 0, "text": answer, "finish_reason": fin.finish_reason, "logprobs": logprobs}
    out = _head(st, go, "text_completion") | {"choices": [choice], "usage": usage(fin)}
    return JSONResponse(out | await asyncio.to_thread(go.extras, st, fin))


def _legacy_logprobs(fmt: LogprobFormatter, fin: Finished) -> dict[str, list[Any]]:
    """The completions ``logprobs`` object: the echoed prompt's tokens (if any), then the completion's."""
    prompt = fmt.legacy(fin.prompt_logprobs)
    fmt.new_segment()  # the completion's text is decoded on its own, as the response text is
    completion = fmt.legacy(fin.logprobs)
    return {k: v + completion[k] for k, v in prompt.items()}


def _head(st: ServerState, go: _Started, obj: str) -> dict[str, Any]:
    """The fields every response and stream chunk starts with (``choices`` and the rest follow)."""
    return {"id": go.rid, "object": obj, "created": go.created, "model": st.model_name}


def _streamed(st: ServerState, go: _Started, body: SamplingRequest, chunk: ChunkFn) -> StreamingResponse:
    """The request's server-sent events; a usage chunk at the end only when ``stream_options`` asks for it."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    events = stream(st, go.req, chunk, chunk if include_usage else None, go.trail, lambda fin: go.extras(st, fin))
    return StreamingResponse(events, media_type="text/event-stream")


def chat_prompt(st: ServerState, body: ChatCompletionRequest) -> tuple[str, list[int]]:
    """The rendered chat prompt and its token ids (run in a worker thread: never on the event loop)."""
    text = render_chat(st, body)
    return text, tokenize_bounded(st, text, add_special_tokens=False)


def render_chat(st: ServerState, body: ChatCompletionRequest) -> str:
    if not getattr(st.tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        text = st.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises for conversations the template does not accept
        raise bad_request(f"messages: the chat template rejected them: {e}", "messages") from e
    return str(text)


Prompt = str | list[str] | list[int] | list[list[int]]


def prompt_text(st: ServerState, prompt: Prompt, ids: list[int]) -> str:
    """The prompt as text (what ``echo`` returns): the string given, or the token ids decoded."""
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], str):
        return prompt[0]
    return str(st.tokenizer.decode(ids, skip_special_tokens=True))


def completion_prompt_ids(st: ServerState, prompt: Prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        if len(prompt) != 1:
            raise bad_request("prompt: exactly one prompt per request (batch by sending concurrent requests)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        ids = [p for p in prompt if isinstance(p, int)]
        bad = [i for i in ids if not 0 <= i < st.vocab_size]
        if bad:
            raise bad_request(f"prompt: token ids {bad[:5]} out of range 0..{st.vocab_size - 1}", "prompt")
        return ids
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("prompt: exactly one prompt per request (batch by sending concurrent requests)", "prompt")
        prompt = str(prompt[0])
    return tokenize_bounded(st, prompt)


def _chat_response(st: ServerState, go: _Started, fin: Finished) -> dict[str, Any]:
    body = _chat_body(st, go, fin)
    if fin.refused_by is not None:  # which detector answered instead of the model
        body["steering_refusal"] = {"detector": fin.refused_by}
    return body


def _chat_body(st: ServerState, go: _Started, fin: Finished) -> dict[str, Any]:
    return _head(st, go, "chat.completion") | {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": fin.text},
                "finish_reason": fin.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(fin),
    }
