"""evals.autointerp against the project's own server (``servers/`` on a tiny model, in process): the explanation
written is the server's greedy answer to the explainer prompt, and a judge that cannot say Yes or No (the tiny
model only knows the words w5..w126) leaves every score null instead of inventing one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_autointerp import make_texts, planted_sae
from test_server_support import MODEL_NAME, make_app, make_presets, serving
from tiny_models import tiny_model, word_tokenizer

from evals.autointerp.config import ExplainConfig
from evals.autointerp.explain import CACHE_FILE, run_explain
from evals.autointerp.index import IndexPlan, build_index
from evals.autointerp.records import (
    EXPLANATIONS_FILE,
    FEATURES_FILE,
    RANDOM_FILE,
    ExplanationRecord,
    FeatureRecord,
    RandomContext,
    read_jsonl,
)
from evals.autointerp.score import EXPLAIN_MAX_TOKENS, explainer_messages, parse_explanation, select_examples


def greedy(model: torch.nn.Module, messages: list[dict[str, str]], n: int) -> str:
    tok = word_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)  # type: ignore[operator]
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_explain_through_the_project_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    indexed = tiny_model("llama", n_layers=2)
    plan = IndexPlan(top_k=10, window=3, n_random=30)
    build_index(
        indexed,
        word_tokenizer(),
        planted_sae(indexed),
        make_texts(),
        tmp_path / "idx",
        plan=plan,
        sae_name="planted",
        model_name="tiny",
        sources=["t"],
    )
    served = tiny_model("llama", n_layers=3)
    app = make_app(make_presets(tmp_path / "presets"), served)
    cfg = ExplainConfig(
        index=tmp_path / "idx",
        endpoint="http://x/v1",
        model=MODEL_NAME,
        features="3,6",
        n_score=2,
        shuffled_baseline=False,
    )
    with serving(app) as base:
        run_explain(cfg.model_copy(update={"endpoint": f"{base}/v1"}))
    rows = {r.feature: r for r in read_jsonl(tmp_path / "idx" / EXPLANATIONS_FILE, ExplanationRecord)}
    assert sorted(rows) == [3, 6]
    records = list(read_jsonl(tmp_path / "idx" / FEATURES_FILE, FeatureRecord))
    pool = list(read_jsonl(tmp_path / "idx" / RANDOM_FILE, RandomContext))
    for f in (3, 6):
        ex = select_examples(f, records[f].top_contexts, pool, n_explain=10, n_score=2, seed=0)
        expected = parse_explanation(greedy(served, explainer_messages(ex.explain), EXPLAIN_MAX_TOKENS))
        assert expected and rows[f].explanation == expected
        assert (rows[f].detection, rows[f].fuzzing, rows[f].explainer, rows[f].n_examples) == (
            None,
            None,
            MODEL_NAME,
            5,
        )
    assert caplog.text.count("answers are neither Yes nor No") == 4
    # 2 explainer prompts + 2 latents x (4 detection + 4 fuzzing) judge prompts, each cached once
    assert len((tmp_path / "idx" / CACHE_FILE).read_text().splitlines()) == 2 + 2 * 8
