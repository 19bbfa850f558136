"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from servers.errors import bad_request
from servers.features import known_sae, response_features
from servers.jobs import Finished
from servers.schemas import ChatCompletionRequest, CompletionRequest
from servers.serving import (
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


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    st = state_of(request)
    check_request(st, body)
    text, prompt_ids = await asyncio.to_thread(chat_prompt, st, body)  # tokenizing a long prompt takes a while
    params = sampling_params(st, body, body.max_completion_tokens or body.max_tokens, len(prompt_ids))
    resolved = await asyncio.to_thread(st.resolver.resolve_all, body.steering)
    steering = resolved.config
    if body.return_features is not None:
        known_sae(st, body.return_features.sae)  # an unknown SAE is a 400 before generating
    req = await submit(st, prompt_ids, resolved, params)
    rid, created = new_id("chatcmpl"), int(time.time())

    def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
        d = {} if delta is None else {"content": delta} if delta else {"role": "assistant", "content": ""}
        choices = [] if delta is None and finish is None else [{"index": 0, "delta": d, "finish_reason": finish}]
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": st.model_name,
            "choices": choices,
        }

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            stream(st, req, chunk, chunk if include_usage else None), media_type="text/event-stream"
        )
    fin = await collect(st, req, request)
    out = _chat_response(st, rid, created, fin)
    if body.return_features is not None:
        out["steering_features"] = await response_features(st, body.return_features, text, fin.text, steering, request)
    return JSONResponse(out)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    st = state_of(request)
    check_request(st, body)
    prompt_ids = await asyncio.to_thread(completion_prompt_ids, st, body.prompt)
    params = sampling_params(st, body, body.max_tokens if body.max_tokens is not None else 16, len(prompt_ids))
    resolved = await asyncio.to_thread(st.resolver.resolve_all, body.steering)
    req = await submit(st, prompt_ids, resolved, params)
    rid, created = new_id("cmpl"), int(time.time())

    def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
        choices = (
            []
            if delta is None and finish is None
            else [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]
        )
        return {"id": rid, "object": "text_completion", "created": created, "model": st.model_name, "choices": choices}

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            stream(st, req, chunk, chunk if include_usage else None), media_type="text/event-stream"
        )
    fin = await collect(st, req, request)
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": st.model_name,
            "choices": [{"index": 0, "text": fin.text, "finish_reason": fin.finish_reason, "logprobs": None}],
            "usage": usage(fin),
        }
    )


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


def completion_prompt_ids(st: ServerState, prompt: str | list[str] | list[int]) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        ids = [int(p) for p in prompt]
        bad = [i for i in ids if not 0 <= i < st.vocab_size]
        if bad:
            raise bad_request(f"prompt: token ids {bad[:5]} out of range 0..{st.vocab_size - 1}", "prompt")
        return ids
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("prompt: exactly one prompt per request (batch by sending concurrent requests)", "prompt")
        prompt = str(prompt[0])
    return tokenize_bounded(st, prompt)


def _chat_response(st: ServerState, rid: str, created: int, fin: Finished) -> dict[str, Any]:
    body = _chat_body(st, rid, created, fin)
    if fin.refused_by is not None:  # which detector answered instead of the model
        body["steering_refusal"] = {"detector": fin.refused_by}
    return body


def _chat_body(st: ServerState, rid: str, created: int, fin: Finished) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": st.model_name,
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
