"""SAE feature inspection: ``POST /v1/features/inspect`` and the ``return_features`` option of chat completions.

Both read a preset SAE at its own site with steerlib's ``inspect_features``, under the request's steering, on the
engine's worker thread (between batches: the model's hooks must not be shared with a running batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from servers.errors import ApiError
from servers.keys import check_steering, key_rule
from servers.registry import PresetError
from servers.schemas import STEERING_DOC, FeatureRequest, RequestModel
from servers.serving import over_limit, run_job
from servers.state import ServerState, state_of
from servers.steering import SteeringField
from steerlib.config import SteeringConfig
from steerlib.extract.activations import prompt_ids
from steerlib.inspect_features import features_over_response, top_features

router = APIRouter(prefix="/v1")


class InspectRequest(RequestModel):
    """Top SAE features per token of a prompt, and of its response if one is given or generated."""

    sae: str = Field(description="Name of an SAE in the presets folder.")
    prompt: str = Field(min_length=1, description="The user prompt (rendered with the chat template if `chat`).")
    response: str | None = Field(None, description="A response to read, teacher forced.")
    generate_tokens: int = Field(0, ge=0, description="Or generate a greedy response of up to this many tokens.")
    k: int = Field(5, ge=1, le=100, description="Features per token.")
    chat: bool = Field(True, description="Render the prompt as one user turn with the chat template.")
    steering: SteeringField | None = Field(None, description=STEERING_DOC)


@router.post("/features/inspect")
async def inspect(body: InspectRequest, request: Request) -> dict[str, Any]:
    st = state_of(request)
    if body.response is not None and body.generate_tokens > 0:
        raise ApiError(400, "give either response or generate_tokens, not both", param="generate_tokens")
    if body.generate_tokens > st.settings.max_tokens_limit:
        raise ApiError(
            400, f"generate_tokens exceeds the limit {st.settings.max_tokens_limit}", param="generate_tokens"
        )
    await asyncio.to_thread(_check_lengths, st, body)
    check_steering(key_rule(request), body.steering, st.resolver.defaults)
    steering = await asyncio.to_thread(st.resolver.resolve, body.steering)
    known_sae(st, body.sae)

    def run() -> dict[str, Any]:
        sae = st.sae(body.sae)
        rows = top_features(
            st.model,
            st.tokenizer,
            sae,
            body.prompt,
            response=body.response,
            k=body.k,
            generate_tokens=body.generate_tokens,
            steering=steering,
            chat=body.chat,
        )
        return {
            "object": "features.inspection",
            "sae": body.sae,
            "site": sae.meta.input_site,
            "tokens": [
                {
                    "token": r.token,
                    "position": r.position,
                    "is_prompt": r.is_prompt,
                    "top": [{"feature": f.feature, "activation": f.activation} for f in r.top],
                }
                for r in rows
            ],
        }

    return await _run(st, run, request)


def _check_lengths(st: ServerState, body: InspectRequest) -> None:
    """The prompt and the response within the server's token limits (tokenized in a worker thread, at a cost
    bounded by the limits: :func:`servers.serving.over_limit`)."""
    s = st.settings
    for field, text, limit in (
        ("prompt", body.prompt, s.max_prompt_tokens),
        ("response", body.response, s.max_tokens_limit),
    ):
        if text is not None and over_limit(st.tokenizer, text, limit, add_special_tokens=False):
            raise ApiError(400, f"{field} has more than {limit} tokens; this server's limit is {limit}", param=field)
    n_prompt = len(prompt_ids(st.tokenizer, body.prompt, body.chat))
    if n_prompt > s.max_prompt_tokens:
        raise ApiError(
            400, f"prompt has {n_prompt} tokens; this server's limit is {s.max_prompt_tokens}", param="prompt"
        )
    if body.response is not None:
        n = len(st.tokenizer(body.response, add_special_tokens=False)["input_ids"])
        if n > s.max_tokens_limit:
            raise ApiError(
                400, f"response has {n} tokens; this server's limit is {s.max_tokens_limit}", param="response"
            )


async def response_features(
    st: ServerState,
    req: FeatureRequest,
    prompt_text: str,
    response: str,
    steering: SteeringConfig | None,
    http: Request,
) -> dict[str, Any]:
    """The features most active over ``response`` (teacher forced after the rendered prompt, same steering)."""

    def run() -> dict[str, Any]:
        if not response:
            return {"sae": req.sae, "n_tokens": 0, "top": []}
        r = features_over_response(
            st.model,
            st.tokenizer,
            st.sae(req.sae),
            prompt_text,
            response=response,
            k=req.k,
            steering=steering,
            reduce=req.reduce,
            chat=False,
        )
        return {
            "sae": req.sae,
            "n_tokens": r.n_tokens,
            "top": [{"feature": f.feature, "activation": f.activation} for f in r.top],
        }

    return await _run(st, run, http)


def known_sae(st: ServerState, name: str) -> None:
    try:
        st.registry.sae(name)
    except PresetError as e:
        raise ApiError(400, str(e), param="sae") from e


async def _run(st: ServerState, fn: Callable[[], dict[str, Any]], http: Request) -> dict[str, Any]:
    try:
        return await run_job(st, fn, http)
    except (ValueError, PresetError) as e:  # SAE/model mismatch, bad site: the request's fault
        raise ApiError(400, str(e), param="sae") from e
