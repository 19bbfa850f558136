"""What an eval runs against: a model in this process under a steering config, or any OpenAI-compatible endpoint.

Both answer ``complete(prompts, steering, max_new_tokens=, system=)`` with one greedy response per prompt, so the same
eval, judges and reports run either way. Through an endpoint the steering travels per request in the body field
``steering`` (this project's server, ``servers/``): a list of preset names, or an inline config whose vectors are
inline floats (:func:`steering_payload` inlines vector files; SAE files cannot travel and are an error). An unsteered
request sends ``steering: []``, which the project's server reads as "no steering" (omitting the field would apply its
default presets); pass ``unsteered="omit"`` for endpoints that know no such field.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

from torch import nn

from evals.loopback import Responder
from steerlib.config import AblateOp, AddOp, ReplaceOp, SaeOp, SteeringConfig
from steerlib.vectors import load_vector

Steering = SteeringConfig | list[str] | None
"""A config, preset names (endpoints only), or None for unsteered."""


class Target(Protocol):
    name: str

    def complete(
        self, prompts: Sequence[str], steering: Steering, *, max_new_tokens: int, system: str | None = None
    ) -> list[str]: ...


class InProcessTarget:
    """A transformers model and tokenizer in this process, steered through :func:`steerlib.hf.generate.generate`."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 8, name: str = "in-process") -> None:
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name

    def complete(
        self, prompts: Sequence[str], steering: Steering, *, max_new_tokens: int, system: str | None = None
    ) -> list[str]:
        from steerlib.hf.generate import generate

        if isinstance(steering, list):
            if steering:
                raise ValueError(f"preset names {steering} need an endpoint target; in process, give a config")
            steering = None
        out = generate(
            self.model,
            self.tokenizer,
            list(prompts),
            steering,
            max_new_tokens=max_new_tokens,
            system=system,
            batch_size=self.batch_size,
        )
        return [g.text for g in out]


class EndpointTarget:
    """Any OpenAI-compatible chat endpoint (``base_url`` like ``http://host:8000/v1``), greedy (temperature 0)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "not-needed",
        timeout: float = 300.0,
        workers: int = 4,
        unsteered: Literal["empty_list", "omit"] = "empty_list",
        name: str = "endpoint",
    ) -> None:
        from openai import OpenAI

        self.model, self.workers, self.unsteered, self.name = model, workers, unsteered, name
        self._client: Any = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=2)

    def complete(
        self, prompts: Sequence[str], steering: Steering, *, max_new_tokens: int, system: str | None = None
    ) -> list[str]:
        extra: dict[str, Any] = {}
        if isinstance(steering, SteeringConfig):
            extra["steering"] = steering_payload(steering)
        elif steering:
            extra["steering"] = list(steering)
        elif self.unsteered == "empty_list":
            extra["steering"] = []

        def one(prompt: str) -> str:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            out = self._client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=0.0,
                max_tokens=max_new_tokens,
                extra_body=extra or None,
            )
            return (out.choices[0].message.content or "").strip()

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(one, prompts))


def steering_payload(config: SteeringConfig) -> dict[str, Any]:
    """A config as request data: vector files inlined as floats (a per-layer file becomes one intervention per
    layer); anything else that names a file (an SAE, a probe file) is an error, since a server reads no client path."""
    interventions: list[dict[str, Any]] = []
    for i, iv in enumerate(config.interventions):
        data = iv.model_dump(mode="json", exclude_none=True)
        where = f"interventions[{i}]"
        if iv.apply.when is not None and isinstance(iv.apply.when.vector, str):
            raise ValueError(f"{where}.apply.when.vector: a probe file cannot be sent to an endpoint; inline it")
        if isinstance(iv, SaeOp | ReplaceOp):
            raise ValueError(
                f"{where}: op {iv.op!r} reads an SAE file, which cannot be sent to an endpoint; "
                "use a preset name the server knows"
            )
        if not isinstance(iv, AddOp | AblateOp) or isinstance(iv.vector, list):
            interventions.append(data)
            continue
        vec = load_vector(config.resolve(iv.vector))
        if None in vec.by_layer:
            interventions.append({**data, "vector": vec.by_layer[None].tolist()})
            continue
        if iv.layer == "all":
            raise ValueError(f"{where}: a per-layer vector file with layer 'all' cannot be inlined; list the layers")
        layers = [iv.layer] if isinstance(iv.layer, int) else iv.layer
        for layer in layers:
            interventions.append({**data, "layer": layer, "vector": vec.for_layer(layer, where=where).tolist()})
    return {"interventions": interventions}


def serve_target(target: Target, *, presets: dict[str, SteeringConfig] | None = None) -> Responder:
    """A :mod:`evals.loopback` responder that answers with ``target``, reading ``steering`` as the project's server
    does (absent or ``[]``: unsteered; preset names, looked up in ``presets``; or an inline config)."""

    def respond(body: dict[str, Any]) -> str:
        messages = body.get("messages") or []
        system = next((m["content"] for m in messages if m.get("role") == "system"), None)
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if len(users) != 1:
            raise ValueError(f"the loopback server takes exactly one user message, got {len(users)}")
        raw = body.get("steering")
        steering: Steering = None
        if isinstance(raw, dict):
            steering = SteeringConfig.from_dict(raw)
        elif raw:
            unknown = [n for n in raw if n not in (presets or {})]
            if unknown:
                raise ValueError(f"unknown presets {unknown}; known: {sorted(presets or {})}")
            steering = SteeringConfig(interventions=[iv for n in raw for iv in (presets or {})[n].interventions])
        max_new = int(body.get("max_tokens") or body.get("max_completion_tokens") or 48)
        return target.complete([users[0]], steering, max_new_tokens=max_new, system=system)[0]

    return respond
