"""The reference SAE's feature index ships with the repository: the browser opens on a fresh clone."""

from __future__ import annotations

from pathlib import Path

import pytest

from servers.browser.index import load_index
from steerlib.sae import load_sae

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "evals" / "autointerp" / "results" / "smollm2_l15_topk32"


def test_the_shipped_index_loads_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    index = load_index(SHIPPED)
    assert index.name == "smollm2_l15_topk32"
    assert index.sae_path == (ROOT / "servers" / "presets" / "saes" / "smollm2-l15-topk32").resolve()
    assert (index.layer, index.site) == (15, "resid_post")
    sae = load_sae(index.sae_path)
    assert index.meta.d_sae == sae.d_sae == 4608
    assert len(index.features) >= 4500  # latents with contexts on 40k held-out tokens
    assert len(index.explanations) >= 100
    rec = index.features[min(index.features)]
    assert rec.top_contexts and rec.max_activation > 0
