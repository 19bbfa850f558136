"""lm-eval's ``steerlib`` model (steerlib.integrations.lm_eval) on the tiny Llama, saved to a folder, and a local task.

Oracles: a direct steered forward pass (the context as one prefill step, the continuation fed after it through the
KV cache: prompt and generated tokens as in generation), lm-eval's own ``hf`` model for the unsteered scores, and
``steerlib.hf.generate.generate`` for ``generate_until``.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from tiny_models import tiny_model, word_tokenizer

import steerlib
from steerlib.hf.generate import generate
from steerlib.integrations.lm_eval.model import SteerlibLM

DOCS = [
    {"question": "w10 w11 w12", "choices": ["w20 w30", "w21 w31", "w22 w32"], "answer": 1},
    {"question": "w40 w41", "choices": ["w50 w60", "w51 w61"], "answer": 0},
]
TASK = {
    "task": "tiny_mc",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{question}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{answer}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}


def _vector(seed: int) -> list[float]:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)).tolist()


def _add(tokens: str = "all", coefficient: float = 4.0) -> dict:
    return {
        "interventions": [
            {"op": "add", "layer": 1, "vector": _vector(0), "coefficient": coefficient, "apply": {"tokens": tokens}}
        ]
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval")
    tiny_model("llama").save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    for name, cfg in {"all": _add(), "generated": _add("generated"), "prompt": _add("prompt")}.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    (root / "tasks").mkdir()
    (root / "tasks" / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task = TASK | {"dataset_kwargs": {"data_files": {"test": str(root / "tasks" / "data.jsonl")}}}
    (root / "tasks" / "tiny_mc.yaml").write_text(yaml.safe_dump(task))
    return root


@pytest.fixture(scope="module")
def oracle_model(folder: Path) -> tuple[torch.nn.Module, object]:
    return steerlib.load_model(str(folder / "model"))


def _direct_logprob(model: torch.nn.Module, ctx: Sequence[int], cont: Sequence[int], cfg: object) -> float:
    """The continuation's steered log-probability: the context read in one step (prompt), each continuation token
    fed after it with the cache (generated), as generation would read them."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ctx_manager = steerlib.steer(model, cfg) if cfg is not None else nullcontext()
    with torch.no_grad(), ctx_manager:
        first = model(input_ids=torch.tensor([list(ctx)]), use_cache=True)
        logits = [first.logits[0, -1:]]
        if len(cont) > 1:
            logits.append(model(input_ids=torch.tensor([list(cont[:-1])]), use_cache=True, **{kw: first[kw]}).logits[0])
    logp = torch.log_softmax(torch.cat(logits).float(), dim=-1)
    return float(logp.gather(-1, torch.tensor(list(cont))[:, None]).sum())


def _ids(tok: object, text: str) -> list[int]:
    return tok.encode(text)  # type: ignore[attr-defined]


def _evaluate(model: str, model_args: dict, folder: Path) -> list[list[float]]:
    """Per document, the log-likelihood of each choice, as lm-eval recorded them."""
    tm = TaskManager(include_path=str(folder / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc"], task_manager=tm)
    assert out is not None
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def test_multiple_choice_scores_are_the_direct_steered_forward(folder: Path, oracle_model: tuple) -> None:
    model, tok = oracle_model
    args = {"pretrained": str(folder / "model"), "device": "cpu"}
    steered = _evaluate("steerlib", args | {"steering": str(folder / "all.yaml")}, folder)
    unsteered = _evaluate("steerlib", args, folder)
    cfg = steerlib.SteeringConfig.from_file(folder / "all.yaml")
    for doc, got_s, got_u in zip(DOCS, steered, unsteered, strict=True):
        ctx = _ids(tok, doc["question"])
        conts = [_ids(tok, f"{doc['question']} {c}")[len(ctx) :] for c in doc["choices"]]
        assert [len(c) for c in conts] == [2] * len(conts)
        assert got_s == [_direct_logprob(model, ctx, c, cfg) for c in conts]
        assert got_u == [_direct_logprob(model, ctx, c, None) for c in conts]
        assert all(abs(s - u) > 1e-3 for s, u in zip(got_s, got_u, strict=True))


def test_unsteered_scores_are_lm_evals_own_hf_model(folder: Path) -> None:
    ours = _evaluate("steerlib", {"pretrained": str(folder / "model"), "device": "cpu"}, folder)
    hf = _evaluate("hf", {"pretrained": str(folder / "model"), "device": "cpu", "dtype": "float32"}, folder)
    # hf reads context and continuation in one forward, steerlib in two (prefill, then the cache): rounding apart
    assert [len(doc) for doc in ours] == [len(doc) for doc in hf] == [3, 2]
    flat = [[lp for doc in run for lp in doc] for run in (ours, hf)]
    torch.testing.assert_close(torch.tensor(flat[0]), torch.tensor(flat[1]), rtol=0, atol=1e-5)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]  # type: ignore[arg-type]


def test_continuation_tokens_are_generated_tokens(folder: Path) -> None:
    """A generated-only op leaves the first continuation token (predicted from the prompt) as it is and steers the
    rest; a prompt-only op steers through the context only."""
    pairs = [("w10 w11 w12", " w20"), ("w10 w11 w12", " w20 w30"), ("w40", " w50 w60 w70")]
    plain = SteerlibLM(pretrained=str(folder / "model")).loglikelihood(_requests("loglikelihood", pairs))
    gen_lm = SteerlibLM(pretrained=str(folder / "model"), steering=str(folder / "generated.yaml"))
    generated = gen_lm.loglikelihood(_requests("loglikelihood", pairs))
    prompt = SteerlibLM(pretrained=str(folder / "model"), steering=str(folder / "prompt.yaml"))
    model, tok = gen_lm.shared.model, gen_lm.tokenizer
    assert generated[0] == plain[0]
    for (ctx, cont), got in zip(pairs[1:], generated[1:], strict=True):
        ids = _ids(tok, ctx + cont)
        want = _direct_logprob(model, ids[: len(_ids(tok, ctx))], ids[len(_ids(tok, ctx)) :], gen_lm.steering)
        assert got[0] == want != plain[pairs.index((ctx, cont))][0]
    prompted = prompt.loglikelihood(_requests("loglikelihood", pairs))
    assert all(p[0] != q[0] for p, q in zip(prompted, plain, strict=True))
    # batched (left-padded contexts, right-padded continuations) scores as one row at a time
    batched = SteerlibLM(pretrained=str(folder / "model"), steering=str(folder / "generated.yaml"), batch_size=3)
    got = batched.loglikelihood(_requests("loglikelihood", pairs))
    torch.testing.assert_close(torch.tensor([g[0] for g in got]), torch.tensor([g[0] for g in generated]))


def test_rolling_scores_a_document_as_generated_text(folder: Path) -> None:
    text = " ".join(f"w{i}" for i in range(10, 30))
    lm = SteerlibLM(pretrained=str(folder / "model"), steering=str(folder / "generated.yaml"))
    (whole,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    ((as_continuation, _),) = lm.loglikelihood(_requests("loglikelihood", [("", text)]))
    assert whole == as_continuation  # one window: the prefix token is the prompt, the document generated
    ids = _ids(lm.tokenizer, text)
    assert whole == _direct_logprob(lm.shared.model, [lm.prefix_token_id], ids, lm.steering)
    short = SteerlibLM(pretrained=str(folder / "model"), steering=str(folder / "generated.yaml"), max_length=8)
    (windowed,) = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    # lm-eval's windows of 8 over 20 tokens, made disjoint: (prompt, scored) = (BOS, 0..7), (7, 8..15), (11..15, 16..19)
    m, st = lm.shared.model, lm.steering
    want = _direct_logprob(m, [lm.prefix_token_id], ids[:8], st) + _direct_logprob(m, ids[7:8], ids[8:16], st)
    assert windowed == want + _direct_logprob(m, ids[11:16], ids[16:20], st)


def test_generate_until_is_steerlib_generate(folder: Path, oracle_model: tuple) -> None:
    model, tok = oracle_model
    cfg = steerlib.SteeringConfig.from_file(folder / "all.yaml")
    contexts = ["w10 w11 w12", "w40 w41"]
    settings = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    lm = SteerlibLM(pretrained=str(folder / "model"), steering=str(folder / "all.yaml"), batch_size=2)
    got = lm.generate_until(_requests("generate_until", [(c, settings) for c in contexts]))
    want = [g.text for g in generate(model, tok, contexts, cfg, max_new_tokens=6, chat=False)]
    plain = [g.text for g in generate(model, tok, contexts, None, max_new_tokens=6, chat=False)]
    assert got == want
    assert got != plain
    stop = want[0].split()[2]
    (cut,) = lm.generate_until(_requests("generate_until", [(contexts[0], settings | {"until": [stop]})]))
    assert cut == want[0][: want[0].index(stop)]


def test_command_line_runs_the_steerlib_model(folder: Path, tmp_path: Path) -> None:
    args = f"pretrained={folder / 'model'},steering={folder / 'all.yaml'},device=cpu"
    cmd = [sys.executable, "-m", "steerlib.integrations.lm_eval", "run", "--model", "steerlib", "--model_args", args]
    cmd += ["--tasks", "tiny_mc", "--include_path", str(folder / "tasks"), "--output_path", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.rglob("results_*.json")
    got = json.loads(result.read_text())["results"]["tiny_mc"]["acc,none"]
    steered = _evaluate("steerlib", {"pretrained": str(folder / "model"), "steering": str(folder / "all.yaml")}, folder)
    want = sum(max(range(len(s)), key=s.__getitem__) == d["answer"] for s, d in zip(steered, DOCS, strict=True))
    assert got == want / len(DOCS)


def test_bad_arguments_are_errors(folder: Path) -> None:
    with pytest.raises(ValueError, match="no 'auto'"):
        SteerlibLM(pretrained=str(folder / "model"), batch_size="auto")
    with pytest.raises(FileNotFoundError, match="no config file"):
        SteerlibLM(pretrained=str(folder / "model"), steering=str(folder / "missing.yaml"))
    bad = folder / "bad.yaml"
    bad.write_text(yaml.safe_dump({"interventions": [{"op": "add", "layer": 9, "vector": _vector(0)}]}))
    with pytest.raises(steerlib.SteeringConfigError, match=r"layer: 9 out of range"):
        SteerlibLM(pretrained=str(folder / "model"), steering=str(bad))
