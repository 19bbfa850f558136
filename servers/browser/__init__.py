"""The feature browser: a page at ``/browser`` to search SAE latents, see their examples, histogram and vocabulary
projection, try them as steering edits beside the unsteered text, save presets, and find the latents a steering
vector or a prompt aligns with. Plain HTML/CSS/JS in ``static/`` (no build step) over the JSON routes of
:mod:`servers.browser.routes`; the data are feature index folders written by ``python -m evals.autointerp index``.

Dashboards of this kind follow Bricken et al., "Towards Monosemanticity" (2023) and Neuronpedia (Lin, 2023).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from servers.browser.index import FeatureIndex, load_indexes
from servers.browser.presets import BrowserRegistry
from servers.browser.routes import STATIC, BrowserState, page_router, router
from servers.settings import ServerSettings

__all__ = ["FeatureIndex", "install", "registry_and_indexes"]


def registry_and_indexes(settings: ServerSettings) -> tuple[BrowserRegistry, BrowserState]:
    """The presets registry that also knows the SAEs of ``settings.features`` and can save presets, and the indexes."""
    indexes = load_indexes(list(settings.features))
    registry = BrowserRegistry(settings.presets, {name: ix.sae_path for name, ix in indexes.items()})
    return registry, BrowserState(indexes)


def install(app: FastAPI, browser: BrowserState, dependencies: list[Any]) -> None:
    """The JSON routes behind ``dependencies`` (the API key); the page and its assets open (they hold no data)."""
    app.state.browser = browser
    app.include_router(router, dependencies=dependencies)
    app.include_router(page_router)
    app.mount("/browser/static", StaticFiles(directory=STATIC), name="browser-static")
