"""evals.autointerp on a tiny model with an SAE whose latents are planted (latent 3 fires on w42 only, latent 6 on
w17 only): the index, the prompts, the score arithmetic, and explain/score runs against the loopback server with a
scripted responder standing in for the remote LLM (resume, cache, unparseable answers, endpoint errors)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

from evals.autointerp.cache import CachedChat, EndpointError, ResponseCache
from evals.autointerp.cli import main
from evals.autointerp.config import ExplainConfig, IndexConfig, parse_features
from evals.autointerp.explain import run_explain
from evals.autointerp.index import IndexPlan, build_index, chunk_texts, truncated
from evals.autointerp.records import (
    BASELINE_FILE,
    EXPLANATIONS_FILE,
    FEATURES_FILE,
    RANDOM_FILE,
    ExplanationRecord,
    FeatureRecord,
    RandomContext,
    read_jsonl,
    read_meta,
)
from evals.autointerp.score import (
    balanced_accuracy,
    explainer_messages,
    parse_explanation,
    parse_yes_no,
    render,
    select_examples,
)
from evals.autointerp.summary import summarize
from evals.loopback import serve
from steerlib.hf.recording import record
from steerlib.sae import ReluSae, SaeMeta, save_sae

D, F = 64, 8
SITE = "blocks.0.hook_resid_pre"  # the token embeddings: a latent can be made to fire on one token only
PLANTED = {3: 42, 6: 17}  # latent -> the only token it fires on


def planted_sae(model: torch.nn.Module) -> ReluSae:
    """Latent 3 fires exactly on w42 and latent 6 on w17 (embedding direction, thresholded); the rest never fire."""
    emb = model.get_input_embeddings().weight.detach()  # type: ignore[operator]
    sae = ReluSae(SaeMeta("relu", D, F, D, SITE, SITE))
    assert sae.b_enc is not None
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
        for latent, token in PLANTED.items():
            e = emb[token] / emb[token].norm()
            sims = emb @ e
            margin = float(sims[token] - sims[torch.arange(len(sims)) != token].max())
            assert margin > 0
            sae.W_enc[:, latent] = e
            sae.b_enc[latent] = -(float(sims[token]) - margin / 2)
    return sae


def make_texts() -> list[str]:
    """40 documents of 12 random words; w42 once in each of docs 0-11, w17 once in each of docs 12-23."""
    rng = random.Random(0)
    pool = [i for i in range(5, 127) if i not in PLANTED.values()]
    docs = []
    for d in range(40):
        words = [f"w{rng.choice(pool)}" for _ in range(12)]
        if d < 24:
            words[rng.randrange(12)] = "w42" if d < 12 else "w17"
        docs.append(" ".join(words))
    return docs


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tok = tiny_model("llama", n_layers=2), word_tokenizer()
    sae = planted_sae(model)
    out = tmp_path_factory.mktemp("index")
    plan = IndexPlan(top_k=10, window=3, n_random=30, batch_size=8)
    build_index(model, tok, sae, make_texts(), out, plan=plan, sae_name="planted", model_name="tiny", sources=["t"])
    return out


def test_truncated_model_reads_the_same_activations() -> None:
    model = tiny_model("llama", n_layers=3)
    ids = torch.tensor([[1, 5, 9, 42, 17, 30]])
    short = truncated(model, 1)
    site = "blocks.1.hook_resid_post"
    with record(model, [site]) as full, torch.no_grad():
        logits = model(input_ids=ids).logits
    with record(short, [site]) as part, torch.no_grad():
        short(input_ids=ids)
    assert torch.equal(full[site], part[site])
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3  # the original is untouched
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_index_files_hold_the_planted_features(index: Path) -> None:
    rows = list(read_jsonl(index / FEATURES_FILE, FeatureRecord))
    assert [r.feature for r in rows] == list(range(F))
    n_tokens = read_meta(index).n_tokens
    assert n_tokens == 40 * 12  # the word tokenizer adds no BOS
    for latent, token in PLANTED.items():
        r = rows[latent]
        assert r.frequency == pytest.approx(12 / n_tokens)
        assert sum(r.histogram.counts) == 12 and len(r.histogram.edges) == len(r.histogram.counts) + 1
        assert len(r.top_contexts) == 10
        peaks = [c.activations for c in r.top_contexts]
        assert [max(a) for a in peaks] == sorted((max(a) for a in peaks), reverse=True)
        for c in r.top_contexts:
            fired = [t for t, a in zip(c.tokens, c.activations, strict=True) if a > 0]
            assert fired == [f"w{token}"]
    assert rows[0].top_contexts == [] and rows[0].frequency == 0 and rows[0].max_activation == 0
    assert len(rows[0].vocab_top) == 10 and len(rows[0].vocab_bottom) == 10
    line = json.loads((index / FEATURES_FILE).read_text().splitlines()[3])
    assert list(line) == [
        "feature",
        "frequency",
        "mean_activation",
        "max_activation",
        "histogram",
        "top_contexts",
        "vocab_top",
        "vocab_bottom",
    ]
    meta = json.loads((index / "meta.json").read_text())
    assert meta == {"sae": "planted", "site": SITE, "model": "tiny", "d_sae": F, "n_tokens": n_tokens, "sources": ["t"]}
    pool = list(read_jsonl(index / RANDOM_FILE, RandomContext))
    assert len(pool) == 30
    for rc in pool:  # a latent is listed active on a token exactly when the token is its planted one
        for t, act in zip(rc.tokens, rc.active, strict=True):
            assert act == [lat for lat, tok in PLANTED.items() if t == f"w{tok}"]


def test_chunk_texts_cuts_documents_and_stops_at_the_budget() -> None:
    tok = word_tokenizer()
    docs = [" ".join(f"w{10 + i}" for i in range(10)), "w50 w51 w52"]
    chunks = chunk_texts(["a", "b"], tok, IndexPlan(tokens=9, chunk_tokens=4), docs=[[docs[0]], [docs[1]]])
    assert chunks == ["w10 w11 w12 w13", "w50 w51 w52", "w14 w15 w16 w17"]


def test_render_marks_runs_and_keeps_spaces_outside() -> None:
    assert render(["a", " b", " c", " d"], {1, 2}) == "a <<b c>> d"
    assert render(["x", "y", " z"], {0, 2}) == "<<x>>y <<z>>"
    assert render(["a", " b"], set()) == "a b"


def test_explainer_prompt_marks_the_firing_tokens(index: Path) -> None:
    rec = list(read_jsonl(index / FEATURES_FILE, FeatureRecord))[3]
    pool = list(read_jsonl(index / RANDOM_FILE, RandomContext))
    ex = select_examples(3, rec.top_contexts, pool, n_explain=10, n_score=4, seed=0)
    assert ex.explain == rec.top_contexts[0::2] and len(ex.explain) == 5
    assert all(c in rec.top_contexts[1::2] for c in ex.activating) and len(ex.activating) == 4
    assert len(ex.quiet) == 4 and all("w42" not in t for q in ex.quiet for t in q)
    user = explainer_messages(ex.explain)[1]["content"]
    assert user.count("<<w42>>") == 5 and user.count("<<") == 5


def test_parsing_and_score_arithmetic() -> None:
    assert parse_yes_no("Yes.") is True and parse_yes_no("no, it does not") is False
    assert parse_yes_no("Maybe") is None and parse_yes_no("yesterday") is None
    assert parse_yes_no("The text does not match the description.") is False
    assert parse_yes_no("The marked tokens don't match") is False and parse_yes_no("It matches. No") is True
    assert parse_yes_no("The text does match the description. It") is True
    assert parse_yes_no("The text does") is None
    assert parse_explanation('Explanation: "the word w42"\nmore') == "the word w42"
    assert parse_explanation("  \n") is None
    assert balanced_accuracy([True, True, False, False], [True, False, False, False]) == 0.75
    assert balanced_accuracy([True, False, False, False], [True, True, True, True]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        balanced_accuracy([True, True], [True, False])


def scripted(calls: list[dict[str, Any]], *, judge: str | None = None, explainer: str | None = None) -> Callable:
    """An explainer that names the most marked word, and a judge that says Yes when that word is in the text
    (detection) or is the marked word (fuzzing); ``judge`` / ``explainer`` fix the answers instead."""

    def respond(body: dict[str, Any]) -> str:
        calls.append(body)
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system.startswith("You explain"):
            if explainer is not None:
                return explainer
            marked = [w.split(">>")[0] for w in user.split("<<")[1:]]
            return f"Explanation: the word {max(set(marked), key=marked.count)}"
        if judge is not None:
            return judge
        word = user.split("Description: the word ")[1].split("\n")[0]
        text = user.split("Text: ")[1].split("\n")[0]
        # the word tokenizer decodes tokens without spaces: "w10w42w9"; no token's name contains another's
        hit = f"<<{word}>>" in text if "marked" in system else word in text
        return "Yes" if hit else "No"

    return respond


def config(index: Path, url: str, **kw: Any) -> ExplainConfig:
    return ExplainConfig.model_validate(
        {"index": index, "endpoint": url, "model": "judge-llm", "features": "3,6", "n_score": 4} | kw
    )


def test_explain_scores_planted_features_resumes_and_caches(index: Path, tmp_path: Path) -> None:
    for name in ("features.jsonl", "meta.json", "random_contexts.jsonl"):
        (tmp_path / name).write_bytes((index / name).read_bytes())
    calls: list[dict[str, Any]] = []
    with serve(scripted(calls)) as url:
        run_explain(config(tmp_path, url))
        rows = {r.feature: r for r in read_jsonl(tmp_path / EXPLANATIONS_FILE, ExplanationRecord)}
        assert rows[3] == ExplanationRecord(
            feature=3, explanation="the word w42", detection=1.0, fuzzing=1.0, explainer="judge-llm", n_examples=5
        )
        assert rows[6].explanation == "the word w17" and (rows[6].detection, rows[6].fuzzing) == (1.0, 1.0)
        base = {r.feature: r for r in read_jsonl(tmp_path / BASELINE_FILE, ExplanationRecord)}
        # Each latent borrows the other's explanation: No on every activating context and every decoy; on the
        # quiet contexts the judge says Yes exactly where the other latent's word occurs.
        assert base[3].explanation == "the word w17" and base[3].explainer == "shuffled:feature 6"
        records = list(read_jsonl(tmp_path / FEATURES_FILE, FeatureRecord))
        pool = list(read_jsonl(tmp_path / RANDOM_FILE, RandomContext))
        for latent, other in ((3, "w17"), (6, "w42")):
            quiet = select_examples(latent, records[latent].top_contexts, pool, n_explain=10, n_score=4, seed=0).quiet
            specificity = sum(other not in q for q in quiet) / len(quiet)
            assert (base[latent].detection, base[latent].fuzzing) == ((0 + specificity) / 2, 0.5)
        assert (
            base[3].detection is not None and base[3].detection < 0.5
        )  # w17 occurs in some of latent 3's quiet contexts (and is counted)
        # 2 explainer calls; per latent 8 detection + 8 fuzzing judge calls, twice (explanation and baseline)
        assert len(calls) == 2 + 2 * 2 * 16
        for body in calls:
            assert body["temperature"] == 0 and body["model"] == "judge-llm"
        n = len(calls)
        run_explain(config(tmp_path, url))  # resume: everything done, nothing asked
        assert len(calls) == n
        assert len((tmp_path / EXPLANATIONS_FILE).read_text().splitlines()) == 2
        (tmp_path / EXPLANATIONS_FILE).unlink()  # a crash that lost the results: the cache still has every answer
        (tmp_path / BASELINE_FILE).unlink()
        run_explain(config(tmp_path, url))
        assert len(calls) == n
        assert {r.feature: r for r in read_jsonl(tmp_path / EXPLANATIONS_FILE, ExplanationRecord)} == rows
    with (tmp_path / EXPLANATIONS_FILE).open("a") as fh:  # a latent finished by two overlapping runs counts once
        fh.write(rows[3].model_copy(update={"detection": 0.0}).model_dump_json() + "\n")
    s = summarize(tmp_path)
    assert s.n_features == 2
    assert s.scores["detection"].mean == 1.0 and s.baseline["fuzzing"].mean == 0.5
    assert s.scores["detection"].ci95 == (1.0, 1.0) and s.scores["detection"].n_null == 0
    assert s.scores["fuzzing"].histogram == [0] * 9 + [2] and s.baseline["fuzzing"].histogram[5] == 2
    diffs = [1.0 - b.detection for b in base.values() if b.detection is not None]
    assert s.paired["detection"].wins == 2 and s.paired["detection"].mean_difference == pytest.approx(sum(diffs) / 2)


def test_unparseable_answers_give_null_scores(index: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("features.jsonl", "meta.json", "random_contexts.jsonl"):
        (tmp_path / name).write_bytes((index / name).read_bytes())
    calls: list[dict[str, Any]] = []
    with serve(scripted(calls, judge="The text does")) as url:
        run_explain(config(tmp_path, url, features="3", shuffled_baseline=False))
    (row,) = read_jsonl(tmp_path / EXPLANATIONS_FILE, ExplanationRecord)
    assert row.explanation == "the word w42" and row.detection is None and row.fuzzing is None
    assert "detection score null: 8/8 answers are neither Yes nor No" in caplog.text
    (tmp_path / EXPLANATIONS_FILE).unlink()
    with serve(scripted(calls, explainer="   ")) as url:
        run_explain(config(tmp_path, url, features="6", shuffled_baseline=False))
    (row,) = read_jsonl(tmp_path / EXPLANATIONS_FILE, ExplanationRecord)
    assert (row.feature, row.explanation, row.detection, row.fuzzing) == (6, "", None, None)


def test_endpoint_errors_are_retried_then_named(tmp_path: Path) -> None:
    attempts: list[int] = []

    def failing(body: dict[str, Any]) -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ValueError("overloaded")
        return "Yes"

    cache = ResponseCache(tmp_path / "cache.jsonl")
    with serve(failing) as url:
        chat = CachedChat(url, "m", cache, retries=2, backoff=0.0)
        assert chat.ask([{"role": "user", "content": "q"}], max_tokens=3) == "Yes"
        assert len(attempts) == 3 and chat.stats.requests == 3
        assert chat.ask([{"role": "user", "content": "q"}], max_tokens=3) == "Yes"  # cached
        assert len(attempts) == 3 and chat.stats.cache_hits == 1
        strict = CachedChat(url, "m", cache, retries=0, backoff=0.0)
        attempts.clear()
        with pytest.raises(EndpointError, match=f"endpoint {url} .model 'm'. failed 1 times"):
            strict.ask([{"role": "user", "content": "other"}], max_tokens=3)
    cache.close()
    assert len(ResponseCache(tmp_path / "cache.jsonl")) == 1


def test_cli_validation_names_the_field(tmp_path: Path) -> None:
    assert parse_features("0-2,5", 8) == [0, 1, 2, 5] and parse_features("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range: the SAE has 8 latents"):
        parse_features("5-9", 8)
    with pytest.raises(ValueError, match="endpoint must be an http"):
        ExplainConfig(index=tmp_path, endpoint="localhost:8000", model="m")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ExplainConfig.model_validate({"index": tmp_path, "endpoint": "http://x/v1", "model": "m", "featurs": "1"})
    with pytest.raises(FileNotFoundError, match="build the index first"):
        main(["explain", "--index", str(tmp_path), "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"])
    cfg = IndexConfig(sae=tmp_path, out=tmp_path)
    assert (cfg.device, cfg.dtype) == ("auto", "auto")
    assert IndexConfig(sae=tmp_path, out=tmp_path, device="cuda:1", dtype="bf16").dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"device\n.*device 'gpu' is not one of: auto .*, cpu, cuda, cuda:N"):
        IndexConfig(sae=tmp_path, out=tmp_path, device="gpu")
    with pytest.raises(ValueError, match=r"dtype\n.*dtype 'fp8' is not one of: auto .*, bfloat16, float16, float32"):
        main(["index", "--sae", str(tmp_path), "--out", str(tmp_path), "--dtype", "fp8"])


def test_index_cli_writes_a_readable_index(tmp_path: Path) -> None:
    model = tiny_model("llama", n_layers=2)
    save_sae(planted_sae(model), tmp_path / "sae")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts()))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    out = tmp_path / "idx"
    argv = ["index", "--sae", str(tmp_path / "sae"), "--out", str(out), "--model", str(folder), "--corpus", str(texts),
            "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    assert main([*argv, "--tokens", "100000", "--top-k", "5", "--n-random", "10"]) == 0
    assert read_meta(out).n_tokens == 40 * 12 and read_meta(out).sources == [str(texts)]
    rows = list(read_jsonl(out / FEATURES_FILE, FeatureRecord))
    assert len(rows) == F and len(rows[3].top_contexts) == 5
