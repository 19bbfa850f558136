"""The feature browser's routes: the page at ``/browser`` and its JSON API under ``/v1``.

    GET  /v1/features/indexes                   the served indexes (name, SAE site, layer, size)
    GET  /v1/features/{index}/search?q=&limit=  latents by explanation substring or top-context/vocabulary token
    GET  /v1/features/{index}/{feature}         everything stored about one latent
    POST /v1/features/{index}/align             latents whose decoder rows align with a preset vector or with a
                                                prompt's last-token activation at the SAE's site (cosine)
    POST /v1/steering/presets                   save a steering config as a named preset (if the server allows)

Generation ("try it") goes through the ordinary ``/v1/chat/completions`` with an inline ``sae`` op on the index's
SAE, so what the page shows is exactly what the API returns. Decoder-direction alignment follows the
feature-steering analyses of Templeton et al., "Scaling Monosemanticity" (2024).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import Field
from torch import Tensor

from servers.browser.index import FeatureIndex, FeatureIndexError
from servers.browser.presets import BrowserRegistry, PresetExistsError
from servers.errors import ApiError
from servers.keys import check_steering, forbid, key_rule
from servers.registry import PresetError
from servers.schemas import RequestModel
from servers.serving import run_job
from servers.state import ServerState, state_of
from servers.steering import InlineSteering
from steerlib.extract.activations import model_device, prompt_ids, run_stack
from steerlib.hf.recording import record
from steerlib.sites import tl_name
from steerlib.vectors import load_vector

STATIC = Path(__file__).parent / "static"

router = APIRouter(prefix="/v1")
page_router = APIRouter()


@dataclass(frozen=True)
class BrowserState:
    indexes: dict[str, FeatureIndex]


class AlignRequest(RequestModel):
    """Give exactly one of ``vector`` and ``prompt``."""

    vector: str | None = Field(None, description="Name of a vector in the presets folder (vectors/<name>).")
    prompt: str | None = Field(None, min_length=1, description="A prompt; its last token's activation is used.")
    chat: bool = Field(True, description="Render the prompt as one user turn with the chat template.")
    k: int = Field(10, ge=1, le=100, description="How many latents to list.")


class SavePresetRequest(RequestModel):
    """A steering config (as in a chat request's inline ``steering``) to keep under a name."""

    name: str = Field(description="Preset name: letters, digits, '_', '-', '.' (max 64).")
    description: str = Field(min_length=1, max_length=500, description="What the preset does.")
    steering: InlineSteering = Field(description="Presets and inline interventions, names only (no paths).")
    overwrite: bool = Field(False, description="Replace a preset of the same name.")


@page_router.get("/browser", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/features/indexes")
async def indexes(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_describe(ix) for ix in _browser(request).indexes.values()]}


@router.get("/features/{index}/search")
async def search(
    request: Request,
    index: str,
    q: str = Query("", max_length=200, description="Text to find; empty lists the most frequent latents."),
    limit: int = Query(20, ge=1, le=500, description="Most results."),
) -> dict[str, Any]:
    ix = _index(request, index)
    hits = ix.search(q, limit)
    data = [ix.summary(h.feature) | {"score": h.score, "matched": h.matched} for h in hits]
    return {"object": "list", "index": ix.name, "query": q, "data": data}


@router.get("/features/{index}/{feature}")
async def feature(request: Request, index: str, feature: int) -> dict[str, Any]:
    ix = _index(request, index)
    _check(ix, feature)
    rec, expl = ix.features.get(feature), ix.explanations.get(feature)
    if rec is None:
        raise ApiError(404, f"index {ix.name!r} stores no statistics for feature {feature}", param="feature")
    return {
        "object": "feature",
        "index": ix.name,
        **rec.model_dump(),
        "explanation": expl.model_dump(exclude={"feature"}) if expl else None,
    }


@router.post("/features/{index}/align")
async def align(request: Request, index: str, body: AlignRequest) -> dict[str, Any]:
    st, ix = state_of(request), _index(request, index)
    if (body.vector is None) == (body.prompt is None):
        raise ApiError(400, "give exactly one of vector (a preset vector name) and prompt", param="vector")
    if body.prompt is not None and len(body.prompt) > 8 * st.settings.max_prompt_tokens:
        raise ApiError(400, "prompt too long", param="prompt")

    def run() -> dict[str, Any]:
        sae = st.sae(ix.name)
        if body.vector is not None:
            target_D, z_F = _vector(st, ix, body.vector), None
        else:
            target_D = _last_activation(st, ix, body.prompt or "", body.chat)
            with torch.no_grad():
                z_F = sae.encode(target_D[None].to(sae.W_enc.dtype)).float()[0]
        if target_D.shape[-1] != sae.W_dec.shape[-1]:
            raise ValueError(f"vector width {target_D.shape[-1]} != the SAE's decoder width {sae.W_dec.shape[-1]}")
        cos_F = torch.nn.functional.cosine_similarity(sae.W_dec.detach().float(), target_D.float()[None], dim=-1)
        vals, idx = cos_F.topk(min(body.k, cos_F.shape[0]))
        rows = []
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
            row = ix.summary(i) | {"cosine": v}
            if z_F is not None:
                row["activation"] = float(z_F[i])
            rows.append(row)
        return {"object": "list", "index": ix.name, "source": "vector" if body.vector else "prompt", "data": rows}

    try:
        result: dict[str, Any] = await run_job(st, run, request)
    except (ValueError, PresetError, FileNotFoundError) as e:
        raise ApiError(400, str(e), param="vector" if body.vector else "prompt") from e
    return result


@router.post("/steering/presets")
async def save_preset(request: Request, body: SavePresetRequest) -> dict[str, Any]:
    st = state_of(request)
    if not st.settings.allow_preset_writes:
        raise ApiError(
            403,
            "saving presets is disabled on this server (start it with --allow-preset-writes true)",
            code="forbidden",
        )
    rule = key_rule(request)
    if not rule.preset_writes:
        raise forbid(rule, "save presets", "preset_writes: false")
    if body.overwrite and not rule.preset_overwrite:
        raise forbid(rule, "overwrite presets", "preset_overwrite: false")
    check_steering(rule, body.steering, [])  # a saved config is not run: it need not carry the defaults
    registry = st.registry
    if not isinstance(registry, BrowserRegistry):
        raise ApiError(500, "the server's registry cannot save presets", type="server_error")
    if body.overwrite and body.name in st.resolver.defaults:
        raise ApiError(
            403, f"preset {body.name!r} is a default preset of this server: it cannot be overwritten from the API",
            param="name", code="forbidden",
        )  # fmt: skip
    if body.overwrite and not st.settings.allow_preset_overwrite:
        raise ApiError(
            403, "overwriting presets is disabled on this server (start it with --allow-preset-overwrite true)",
            param="overwrite", code="forbidden",
        )  # fmt: skip
    config = await asyncio.to_thread(st.resolver.resolve, body.steering)
    if config is None:
        raise ApiError(400, "steering has no interventions and no presets: nothing to save", param="steering")
    try:
        info = await asyncio.to_thread(registry.save, body.name, body.description, config, overwrite=body.overwrite)
    except PresetExistsError as e:
        raise ApiError(409, str(e), param="name", code="preset_exists") from e
    except PresetError as e:
        raise ApiError(400, str(e), param="name") from e
    return {"object": "steering.preset", **info.model_dump()}


def _browser(request: Request) -> BrowserState:
    bs: BrowserState = request.app.state.browser
    return bs


def _index(request: Request, name: str) -> FeatureIndex:
    indexes = _browser(request).indexes
    if name not in indexes:
        valid = ", ".join(sorted(indexes)) or "none (start the server with --features DIR)"
        raise ApiError(404, f"unknown feature index {name!r}; served indexes: {valid}", param="index")
    return indexes[name]


def _check(ix: FeatureIndex, feature: int) -> None:
    try:
        ix.check_feature(feature)
    except FeatureIndexError as e:
        raise ApiError(404, str(e), param="feature") from e


def _describe(ix: FeatureIndex) -> dict[str, Any]:
    return {
        "name": ix.name,
        "sae": ix.name,
        "layer": ix.layer,
        "site": ix.site,
        "model": ix.meta.model,
        "d_sae": ix.meta.d_sae,
        "n_tokens": ix.meta.n_tokens,
        "sources": ix.meta.sources,
        "n_features": len(ix.features),
        "n_explained": len(ix.explanations),
    }


def _vector(st: ServerState, ix: FeatureIndex, name: str) -> Tensor:
    return load_vector(st.registry.vector(name)).for_layer(ix.layer, where=f"vector {name!r}")


def _last_activation(st: ServerState, ix: FeatureIndex, prompt: str, chat: bool) -> Tensor:
    """The activation ``(D,)`` at the index's site on the prompt's last token (one forward, no steering)."""
    ids = prompt_ids(st.tokenizer, prompt, chat)
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens")
    if len(ids) > st.settings.max_prompt_tokens:
        raise ValueError(f"prompt has {len(ids)} tokens; the limit is {st.settings.max_prompt_tokens}")
    name = tl_name(ix.layer, ix.site)
    ids_BT = torch.tensor([ids], device=model_device(st.model))
    with record(st.model, [name]) as rec, torch.no_grad():
        run_stack(st.model, ids_BT, torch.ones_like(ids_BT))
    return rec[name][-1].float().cpu()
