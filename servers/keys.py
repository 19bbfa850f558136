"""Per-key policy: an operator file mapping API keys to what they may do, enforced before a request is queued.

    # keys.yaml (``--key-policy keys.yaml``)
    keys:
      - name: app                       # shown in errors and the audit log
        key_sha256: 9f86d0...            # sha256 of the key (hex), so the file holds no secret; or `key: <plain>`
        presets: [refusal_add]           # presets it may name ("*": any)
        inline: false                    # may it send inline interventions?
        skip_defaults: false             # may it opt out of (or replace) the server's default presets?
      - name: research
        key: s3cret
        ops: [add, sae]                  # inline ops it may use ("*": any)
        max_coefficient: 8               # caps on inline values (below the server's own)
        max_edit_value: 50
        preset_writes: true              # may save presets (the server must allow writes too)
        preset_overwrite: false          # ... and replace existing ones (the server must allow it too)

A refused request is a 403 naming the key and the rule (``code: forbidden_by_policy``). Without a policy file the
server's own ``api_key`` (or none) grants everything the server's settings allow.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Literal

import yaml
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from servers.errors import ApiError
from servers.steering import InlineSteering, SteeringField

OpName = Literal["add", "ablate", "sae", "replace", "refuse"]


class KeyRule(BaseModel):
    """What one key may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, description="Shown in errors and the audit log.")
    key: str | None = Field(None, min_length=1, description="The key itself.")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Or its sha256, hex.")
    presets: list[str] | Literal["*"] = Field("*", description="Presets it may name.")
    inline: bool = Field(True, description="May it send inline interventions.")
    ops: list[OpName] | Literal["*"] = Field("*", description="Inline ops it may use.")
    max_coefficient: float | None = Field(None, gt=0, description="Cap on inline |coefficient|.")
    max_edit_value: float | None = Field(None, gt=0, description="Cap on inline |edit value|.")
    skip_defaults: bool = Field(True, description="May it opt out of, or leave out, the default presets.")
    preset_writes: bool = Field(False, description="May it save presets (if the server allows writes).")
    preset_overwrite: bool = Field(False, description="May it replace presets (if the server allows it).")

    @model_validator(mode="after")
    def _one_key(self) -> KeyRule:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"key {self.name!r}: give exactly one of key and key_sha256")
        if self.key is not None and not self.key.strip():
            raise ValueError(f"key {self.name!r}: the key is empty")
        return self

    def digest(self) -> str:
        return self.key_sha256 or hashlib.sha256((self.key or "").encode()).hexdigest()


OPEN = KeyRule(name="default", key="-", preset_writes=True, preset_overwrite=True)
"""A server without a policy file: the server's settings alone decide."""


class KeyPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[KeyRule] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> KeyPolicy:
        names = [k.name for k in self.keys]
        digests = [k.digest() for k in self.keys]
        if len(set(names)) != len(names) or len(set(digests)) != len(digests):
            raise ValueError("key policy: every key needs its own name and its own key")
        return self

    @classmethod
    def load(cls, path: Path) -> KeyPolicy:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    def find(self, token: str) -> KeyRule | None:
        """The rule of the key ``token`` (compared in constant time, as digests)."""
        digest = hashlib.sha256(token.encode()).hexdigest().encode()
        found = None
        for rule in self.keys:
            if secrets.compare_digest(rule.digest().encode(), digest):
                found = rule
        return found


def key_rule(request: Request) -> KeyRule:
    """The rule the caller's key was given (set by the app's key check)."""
    rule: KeyRule = getattr(request.state, "key_rule", OPEN)
    return rule


def forbid(rule: KeyRule, what: str, field: str) -> ApiError:
    return ApiError(
        403, f"key {rule.name!r} may not {what} (rule {field})", param="steering", code="forbidden_by_policy"
    )


def check_steering(rule: KeyRule, steering: SteeringField | None, defaults: list[str]) -> None:
    """ApiError 403 for the first thing ``steering`` does that ``rule`` forbids. ``defaults``: the server's default
    presets, which every key may name (and a key without ``skip_defaults`` must run under, in front)."""
    if rule is OPEN or steering is None:
        return
    names = list(steering) if isinstance(steering, list) else list(steering.presets)
    if rule.presets != "*":
        for name in names:
            if name not in rule.presets and name not in defaults:  # the server's defaults: anyone's
                raise forbid(rule, f"use preset {name!r}", f"presets: {', '.join(rule.presets) or 'none'}")
    if not rule.skip_defaults and names[: len(defaults)] != defaults:
        raise forbid(rule, f"leave out the default presets {defaults}", "skip_defaults: false")
    if isinstance(steering, InlineSteering) and steering.interventions:
        _check_inline(rule, steering)


def _check_inline(rule: KeyRule, steering: InlineSteering) -> None:
    if not rule.inline:
        raise forbid(rule, "send inline interventions", "inline: false")
    for i, iv in enumerate(steering.interventions):
        if rule.ops != "*" and iv.op not in rule.ops:
            raise forbid(rule, f"use op {iv.op!r} (interventions[{i}])", f"ops: {', '.join(rule.ops)}")
        c = getattr(iv, "coefficient", None)
        if rule.max_coefficient is not None and c is not None and abs(c) > rule.max_coefficient:
            raise forbid(
                rule, f"use coefficient {c:g} (interventions[{i}])", f"max_coefficient: {rule.max_coefficient:g}"
            )
        cap = rule.max_edit_value
        for j, e in enumerate(getattr(iv, "edits", None) or []):
            if cap is not None and abs(e.value) > cap:
                raise forbid(
                    rule, f"set an edit to {e.value:g} (interventions[{i}].edits[{j}])", f"max_edit_value: {cap:g}"
                )
