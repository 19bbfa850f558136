"""``GET /v1/steering/presets``: the presets, vectors and SAEs requests can name."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from servers.state import state_of

router = APIRouter(prefix="/v1")


@router.get("/steering/presets")
async def presets(request: Request) -> dict[str, Any]:
    st = state_of(request)
    reg = st.registry
    return {
        "object": "list",
        "data": [p.model_dump() for p in reg.infos()],
        "default": st.resolver.defaults,
        "vectors": reg.available("vector"),
        "probes": reg.available("probe"),
        "saes": reg.available("sae"),
    }
