"""A request's steering as it travels through vLLM: ``SamplingParams.extra_args["steering"]`` and its cache key.

Over HTTP the same dict goes in ``vllm_xargs`` (or the request body's ``extra_args``). Data only: vectors inline, or
files under the operator's steering root; nothing executable is ever accepted.

Confinement: a request may name files (vectors, SAEs, probes) only when the operator has set a steering root
(``STEERLIB_VLLM_STEERING_ROOT`` where vLLM runs, or ``steerlib.vllm.engine_kwargs(steering_root=DIR)``); each
reference is resolved (symlinks followed) against the root, or the request's ``steering_base_dir`` if that lies
inside the root, and must land inside the root. Absolute paths outside it, ``~`` and ``..`` escapes are refused with
an error naming the field and never showing the root, so neither loading nor its failure reveals other files. The
front end, the scheduler's check and the workers all parse through :func:`parse_steering`, so they agree.

Prefix caching (vLLM reuses KV blocks whose tokens, and salt, match) must never hand a request KV computed under
other steering. :func:`cache_salt` keys a request's blocks by its steering. When the steering of a token depends
on more than the tokens before it and their absolute positions (prompt vs generated, positions counted from the
end of the prompt, ``last``, a verdict read from the whole prompt), two requests that share a prefix may still
need different KV for it, so such a request gets a salt of its own and shares nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steerlib.config import ApplyPolicy, FileRef, SteeringConfig, TokenSelector

STEERING_KEY = "steering"
"""Key of the steering config (a dict, as in a YAML/JSON config file) in ``SamplingParams.extra_args``."""
BASE_DIR_KEY = "steering_base_dir"
"""Optional folder (inside the steering root) that relative file references of the config resolve against."""
ROOT_ENV = "STEERLIB_VLLM_STEERING_ROOT"
"""The operator's folder: the only place a request's file references may point into."""


def steering_root() -> Path | None:
    """The operator's steering root (``$STEERLIB_VLLM_STEERING_ROOT``, resolved), or None when none is set."""
    raw = os.environ.get(ROOT_ENV)
    return Path(raw).expanduser().resolve() if raw else None


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
    return confine(SteeringConfig.from_dict(data), extra_args.get(BASE_DIR_KEY), steering_root())


def confine(cfg: SteeringConfig, base: str | None, root: Path | None) -> SteeringConfig:
    """``cfg`` with every file reference resolved inside ``root`` (absolute), or a ``ValueError`` naming the field."""
    refs = cfg.refs()
    if not refs:
        return cfg
    if root is None:
        raise ValueError(
            f"{refs[0].where}: a request names files only under the operator's steering root, and none is set "
            f"({ROOT_ENV} where vLLM runs, or steerlib.vllm.engine_kwargs(steering_root=DIR)); send vectors inline"
        )
    start = root if base is None else _inside(Path(str(base)), root, BASE_DIR_KEY)

    def one(ref: FileRef) -> str:
        if ref.ref.startswith("~"):
            raise ValueError(f"{ref.where}: '~' paths are not allowed; name a file inside the steering root")
        path = Path(ref.ref)
        return str(_inside(path if path.is_absolute() else start / path, root, ref.where))

    return cfg.map_refs(one)


def _inside(path: Path, root: Path, where: str) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{where}: outside the operator's steering root; name a file inside it")
    return resolved


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
