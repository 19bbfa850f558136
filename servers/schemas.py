"""OpenAI request and response bodies (chat completions, completions), plus the server's steering extras.

Requests accept the fields OpenAI's API defines (clients send some we do not use) and reject unknown ones
(``extra="forbid"``: a misspelt ``steering`` must not silently run unsteered). Fields that would change the answer
in a way this server does not implement (``n > 1``, ``logit_bias``, tools, ``suffix``, ``best_of``, ...) are refused
with a 400 by :func:`unsupported` rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from servers.activations import ActivationRequest
from servers.steering import SteeringField

MIN_TEMPERATURE = 1e-3
"""Smallest positive temperature: logits divided by less than this leave float32 (sampling then is greedy anyway)."""
INT64 = 2**63
STEERING_DOC = (
    "Steering for this request: a list of preset names, or {presets: [...], interventions: [...]} with vectors as "
    "inline floats or {preset_vector: name} and SAEs by preset name. Omitted: the server's default presets; "
    "[]: unsteered."
)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(RequestModel):
    include_usage: bool = False


class FeatureRequest(RequestModel):
    """Return the SAE features most active over the response (the traits behind an answer)."""

    sae: str = Field(description="Name of an SAE in the presets folder.")
    k: int = Field(10, ge=1, le=100, description="How many features.")
    reduce: Literal["sum", "max"] = Field("sum", description="Rank by summed or by maximal activation.")


class SamplingRequest(RequestModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description=f"0 (greedy) or {MIN_TEMPERATURE:g}..2 (sampling).")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-INT64, lt=INT64, description="Sampling seed, a signed 64-bit integer.")
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    user: str | None = None
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="-2..2: each generated token's logit less this times its count so far."
    )
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="-2..2: each token already generated has its logit lowered by this."
    )
    logit_bias: dict[str, float] | None = None
    steering: SteeringField | None = Field(None, description=STEERING_DOC)
    return_activations: ActivationRequest | None = Field(
        None, description="Read the model while it answers (``servers.activations``): `steering_activations`."
    )
    steering_audit: bool | None = Field(
        None,
        description="Return the audit record (`steering_audit`): presets and ops applied, each gate's score and "
        "decision, the detector that answered, tokens each op touched.",
    )

    @field_validator("temperature")
    @classmethod
    def _samplable(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature {v:g} is too small to sample with; use 0 for greedy decoding or {MIN_TEMPERATURE:g}..2"
            )
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_logprobs_asked(self) -> tuple[int | None, str]:
        """How many alternatives per token to report (None: no log-probabilities) and the field that says so."""
        return None, "logprobs"


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(
        None, ge=0, description="With logprobs: the most likely tokens per position (at most `max_top_logprobs`)."
    )
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    return_features: FeatureRequest | None = Field(None, description="Top SAE features over the response.")

    def top_logprobs_asked(self) -> tuple[int | None, str]:
        return (self.top_logprobs or 0 if self.logprobs else None), "top_logprobs"


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="One prompt: a string, token ids, or a list holding one of either."
    )
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo (score the prompt, generate nothing).")
    echo: bool | None = Field(None, description="Return the prompt before the completion (with logprobs: its scores).")
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(
        None, ge=0, description="Return each token's log-probability and this many alternatives (<= max_top_logprobs)."
    )

    def top_logprobs_asked(self) -> tuple[int | None, str]:
        return self.logprobs, "logprobs"


def unsupported(req: SamplingRequest) -> tuple[str, str] | None:
    """The first field set to something this server does not do, as ``(field, error message)``; None when all is
    fine."""
    if req.n not in (None, 1):
        return "n", "n: only n=1 is supported"
    if req.logit_bias:
        return "logit_bias", "logit_bias is not supported"
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if (
            req.tools
            or req.functions
            or req.function_call not in (None, "none")
            or req.tool_choice not in (None, "none")
        ):
            return "tools", "tools / function calling are not supported"
        if req.response_format and req.response_format.get("type") != "text":
            return "response_format", "response_format: only {'type': 'text'} is supported"
        if req.modalities and req.modalities != ["text"]:
            return "modalities", "modalities: only ['text'] is supported"
        if req.return_features is not None and req.stream:
            return "return_features", "return_features is only available without stream"
    if isinstance(req, CompletionRequest):
        if req.suffix or (req.best_of or 1) > 1:
            return "suffix" if req.suffix else "best_of", "suffix / best_of are not supported"
        if req.max_tokens == 0 and not req.echo:
            return "max_tokens", "max_tokens: 0 needs echo: true (score the prompt, generate nothing)"
        if req.echo and req.stream:
            return "echo", "echo is only available without stream"
    return None
