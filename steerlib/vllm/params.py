"""A request's steering as it travels through vLLM: ``SamplingParams.extra_args["steering"]`` and its cache key.

Over HTTP the same dict goes in ``vllm_xargs`` (or the request body's ``extra_args``). Data only: vectors inline or
as paths readable by the server; nothing executable is ever accepted.

Prefix caching (vLLM reuses KV blocks whose tokens, and salt, match) must never hand a request KV computed under
other steering. :func:`cache_salt` keys a request's blocks by its steering. When the steering of a token depends
on more than the tokens before it and their absolute positions (prompt vs generated, positions counted from the
end of the prompt, ``last``, a verdict read from the whole prompt), two requests that share a prefix may still
need different KV for it, so such a request gets a salt of its own and shares nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from steerlib.config import ApplyPolicy, SteeringConfig, TokenSelector

STEERING_KEY = "steering"
"""Key of the steering config (a dict, as in a YAML/JSON config file) in ``SamplingParams.extra_args``."""
BASE_DIR_KEY = "steering_base_dir"
"""Optional folder that relative file references of the config resolve against."""


def steering_args(config: SteeringConfig) -> dict[str, Any]:
    """``extra_args`` for ``SamplingParams`` that steer a request with ``config``."""
    out: dict[str, Any] = {STEERING_KEY: config.model_dump(mode="json", exclude_none=True)}
    if config.base_dir is not None:
        out[BASE_DIR_KEY] = str(config.base_dir)
    return out


def parse_steering(extra_args: Mapping[str, Any] | None) -> SteeringConfig | None:
    """The request's config, or None when it is unsteered. Invalid configs raise ``ValueError`` naming the field."""
    if not extra_args or extra_args.get(STEERING_KEY) is None:
        return None
    data = extra_args[STEERING_KEY]
    if isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict):
        raise ValueError(f"extra_args[{STEERING_KEY!r}] must be a steering config (a mapping), got {type(data)}")
    return SteeringConfig.from_dict(data, base_dir=extra_args.get(BASE_DIR_KEY))


def config_key(config: SteeringConfig) -> str:
    """Equal for configs that steer identically (same fields but the description, same base folder)."""
    body = json.dumps(config.model_dump(mode="json", exclude={"description"}), sort_keys=True, separators=(",", ":"))
    return f"{config.base_dir}|{body}"


def prefix_stable(config: SteeringConfig) -> bool:
    """True if each token's steering depends only on itself, the tokens before it and its absolute position."""
    return all(_stable_policy(iv.apply) for iv in config.interventions)


def _stable_selector(sel: TokenSelector) -> bool:
    return sel.tokens == "all" and sel.last is None and all(p >= 0 for p in sel.positions or ())


def _stable_policy(ap: ApplyPolicy) -> bool:
    if not _stable_selector(ap):
        return False
    if ap.exclude is not None and not _stable_selector(ap.exclude):
        return False
    return ap.when is None or ap.when.scope == "token"


def cache_salt(config: SteeringConfig, request_id: str, salt: str | None = None) -> str:
    """The prefix-cache salt of a steered request (``salt`` is the one the client gave, if any)."""
    digest = hashlib.sha256(config_key(config).encode()).hexdigest()[:32]
    own = "" if prefix_stable(config) else f":{request_id}"
    return f"{salt or ''}|steerlib:{digest}{own}"
