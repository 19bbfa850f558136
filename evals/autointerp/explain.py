"""Explain and score SAE latents through an OpenAI-compatible endpoint: resumable, cached, a few requests in flight.

For each latent (prompts and scores in :mod:`evals.autointerp.score`): one explainer call over its max-activating
contexts, then one judge call per detection and per fuzzing example. Each finished latent is appended to
``explanations.jsonl``; a re-run skips latents already there, and every raw response is cached
(:mod:`evals.autointerp.cache`), so a crashed run re-asks nothing it already asked.

Baseline (``shuffled_baseline``): every scored latent is scored again, on the same examples, with the explanation
of another latent (a random derangement), into ``explanations_shuffled.jsonl``. The gap between the two is what
the explanations tell the judge beyond the judge's own bias (e.g. answering Yes to everything scores 0.5 in both).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path

from tqdm import tqdm

from evals.autointerp.cache import CachedChat, ResponseCache
from evals.autointerp.config import ExplainConfig, parse_features
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
    EXPLAIN_MAX_TOKENS,
    JUDGE_MAX_TOKENS,
    Examples,
    Item,
    detection_items,
    explainer_messages,
    fuzzing_items,
    parse_explanation,
    score_answers,
    select_examples,
)

logger = logging.getLogger(__name__)
CACHE_FILE = "cache.jsonl"


class Scorer:
    """Explains and scores one latent at a time; thread-safe (the cache and the clients are)."""

    def __init__(self, explainer: CachedChat, judge: CachedChat, *, n_explain: int, n_score: int, seed: int) -> None:
        self.explainer, self.judge = explainer, judge
        self.n_explain, self.n_score, self.seed = n_explain, n_score, seed

    def examples(self, rec: FeatureRecord, pool: Sequence[RandomContext]) -> Examples:
        return select_examples(
            rec.feature, rec.top_contexts, pool, n_explain=self.n_explain, n_score=self.n_score, seed=self.seed
        )

    def explain(self, feature: int, ex: Examples) -> str | None:
        answer = self.explainer.ask(explainer_messages(ex.explain), max_tokens=EXPLAIN_MAX_TOKENS)
        text = parse_explanation(answer)
        if text is None:
            logger.warning("feature %d: no explanation in the explainer's answer %r; scores null", feature, answer[:80])
        return text

    def score(self, feature: int, explanation: str, ex: Examples) -> tuple[float | None, float | None]:
        return self._one(feature, "detection", detection_items(explanation, ex)), self._one(
            feature, "fuzzing", fuzzing_items(explanation, ex)
        )

    def _one(self, feature: int, kind: str, items: list[Item]) -> float | None:
        answers = [self.judge.ask(it.messages, max_tokens=JUDGE_MAX_TOKENS) for it in items]
        value, why = score_answers(items, answers)
        if value is None:
            logger.warning("feature %d: %s score null: %s", feature, kind, why)
        return value

    def run(self, rec: FeatureRecord, pool: Sequence[RandomContext]) -> ExplanationRecord:
        ex = self.examples(rec, pool)
        text = self.explain(rec.feature, ex)
        det, fuzz = self.score(rec.feature, text, ex) if text is not None else (None, None)
        return ExplanationRecord(
            feature=rec.feature,
            explanation=text or "",
            detection=det,
            fuzzing=fuzz,
            explainer=self.explainer.model,
            n_examples=len(ex.explain),
        )


def done_features(path: Path) -> set[int]:
    return {r.feature for r in read_jsonl(path, ExplanationRecord)} if path.is_file() else set()


def run_parallel(
    tasks: Sequence[Callable[[], ExplanationRecord]], out: Path, concurrency: int, desc: str
) -> list[ExplanationRecord]:
    """Run ``tasks`` ``concurrency`` at a time, appending each result to ``out`` as it finishes.

    The first failure stops the run (tasks not started are cancelled) and is re-raised; finished lines stay.
    """
    lock = threading.Lock()
    results: list[ExplanationRecord] = []
    with out.open("a", encoding="utf-8") as fh, tqdm(total=len(tasks), desc=desc, unit="feature") as bar:

        def finish(fut: Future[ExplanationRecord]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            rec = fut.result()
            with lock:
                fh.write(rec.model_dump_json() + "\n")
                fh.flush()
                results.append(rec)
                bar.update(1)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(t) for t in tasks]
            for f in futures:
                f.add_done_callback(finish)
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in finished if not f.cancelled() and f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()
                error = failed[0].exception()
                assert error is not None
                raise error
    return results


def derangement(features: Sequence[int], seed: int) -> dict[int, int]:
    """feature -> a different feature whose explanation it borrows (a random cycle through all of them)."""
    order = list(features)
    random.Random(seed).shuffle(order)
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))} if len(order) > 1 else {}


def run_explain(cfg: ExplainConfig) -> None:
    meta = read_meta(cfg.index)
    wanted = parse_features(cfg.features, meta.d_sae)
    pool = list(read_jsonl(cfg.index / RANDOM_FILE, RandomContext))
    wanted_set = set(wanted)
    records = {r.feature: r for r in read_jsonl(cfg.index / FEATURES_FILE, FeatureRecord) if r.feature in wanted_set}
    cache = ResponseCache(cfg.index / CACHE_FILE)
    try:
        explainer, judge = (
            CachedChat(cfg.endpoint, name, cache, api_key=cfg.api_key, timeout=cfg.timeout, retries=cfg.retries)
            for name in (cfg.model, cfg.judge_model or cfg.model)
        )
        scorer = Scorer(explainer, judge, n_explain=cfg.n_explain, n_score=cfg.n_score, seed=cfg.seed)
        run_scoring(
            scorer, records, pool, cfg.index, cfg.concurrency, cfg.min_contexts, cfg.shuffled_baseline, cfg.seed
        )
        logger.info(
            "endpoint requests %d, cache hits %d (judge); explainer requests %d, hits %d",
            judge.stats.requests,
            judge.stats.cache_hits,
            explainer.stats.requests,
            explainer.stats.cache_hits,
        )
    finally:
        cache.close()


def run_scoring(
    scorer: Scorer,
    records: dict[int, FeatureRecord],
    pool: Sequence[RandomContext],
    index: Path,
    concurrency: int,
    min_contexts: int,
    baseline: bool,
    seed: int,
) -> None:
    """Explain and score ``records`` not yet in ``explanations.jsonl``, then (if asked) the shuffled baseline."""
    out = index / EXPLANATIONS_FILE
    done = done_features(out)
    todo = []
    for f, rec in sorted(records.items()):
        if len(rec.top_contexts) < min_contexts:
            logger.warning("feature %d skipped: %d top contexts (< %d)", f, len(rec.top_contexts), min_contexts)
        elif f not in done:
            todo.append(rec)
    logger.info("%d features to explain (%d already done)", len(todo), len(done & set(records)))
    run_parallel([partial(scorer.run, r, pool) for r in todo], out, concurrency, "explain")
    if baseline:
        explained = {r.feature: r for r in read_jsonl(out, ExplanationRecord) if r.feature in records and r.explanation}
        donors = derangement(sorted(explained), seed)
        base_out = index / BASELINE_FILE
        base_done = done_features(base_out)
        tasks = [
            partial(_shuffled, scorer, records[f], explained[d], pool) for f, d in donors.items() if f not in base_done
        ]
        run_parallel(tasks, base_out, concurrency, "baseline")


def _shuffled(
    scorer: Scorer, rec: FeatureRecord, donor: ExplanationRecord, pool: Sequence[RandomContext]
) -> ExplanationRecord:
    ex = scorer.examples(rec, pool)
    det, fuzz = scorer.score(rec.feature, donor.explanation, ex)
    return ExplanationRecord(
        feature=rec.feature,
        explanation=donor.explanation,
        detection=det,
        fuzzing=fuzz,
        explainer=f"shuffled:feature {donor.feature}",
        n_examples=donor.n_examples,
    )
