"""Jailbreak templates collected in the wild, grouped into families, and split by family into fit and evaluation.

The templates are the ones ``pyrit==1.1.0`` ships under ``pyrit/datasets/jailbreak/templates/`` (YAML files whose
``value`` holds a ``{{ prompt }}`` slot): persona prompts from the former jailbreakchat site (DAN and its kin),
TrustAIRLab's in-the-wild collection (Shen et al., "Do Anything Now", arXiv 2308.03825), Pliny's per-vendor prompts
and Arth Singh's scenario prompts. The wheel is downloaded with pip (``--no-deps``), pinned by its sha256, and only
its YAML files are read; pyrit's code is never imported.

Many templates are near copies of each other (DAN 5 and DAN 11, an in-the-wild prompt that is DAN 9 with one line
changed), so a split by file would put the same jailbreak on both sides. A *family* is a connected group under two
links: the same name stem (``dan_1`` and ``dan_11``; a Pliny vendor folder) or word 5-shingle overlap (Jaccard) of
at least :data:`NEAR_DUPLICATE`. Families are split per source collection in an order fixed by a hash of their name,
alternating, so both sides hold every collection and no family is on both.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from sae_train.fetch import check_sha256, client_command, read_members, run_client, sha256_file, sha256_of
from steerlib.hf.loading import cache_root

Side = Literal["fit", "eval"]

PYRIT_WHEEL = "pyrit-1.1.0-py3-none-any.whl"
PYRIT_WHEEL_SHA256 = "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a"
TEMPLATES_DIR = "pyrit/datasets/jailbreak/templates/"
SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
RAW = re.compile(r"\{%-?\s*(?:end)?raw\s*-?%\}")
"""Jinja's raw markers, which in-the-wild templates wrap their text in (the text between them is literal)."""
NEAR_DUPLICATE = 0.3
"""Word 5-shingle Jaccard similarity at or above which two templates are one family."""
MAX_CHARS = 3000
"""Longer templates are left out (about 750 tokens): they cost the most compute and add little."""


@dataclass(frozen=True)
class Template:
    name: str
    """The file's path under the templates folder, without ``.yaml`` (``in_the_wild/trustairlab_0a77f8461377b015``)."""
    source: str
    """The collection: ``jailbreakchat`` (the folder's top level), ``in_the_wild``, ``pliny``, ``arth_singh``."""
    text: str
    """The template with one ``{{ prompt }}`` slot."""
    family: str = ""

    def fill(self, request: str) -> str:
        return SLOT.sub(lambda _: request, self.text, count=1)


def source_of(name: str) -> str:
    top = name.split("/", 1)[0] if "/" in name else ""
    return {"": "jailbreakchat", "multi_parameter": "jailbreakchat", "Arth_Singh": "arth_singh"}.get(top, top)


def stem_of(name: str) -> str:
    """The name stem that links numbered variants: ``dan_11`` -> ``dan``; a Pliny file -> its vendor folder; an
    in-the-wild file has no stem of its own (its name is a hash)."""
    parts = name.split("/")
    if parts[0] == "pliny" and len(parts) == 3:
        return f"pliny/{parts[1]}"
    if parts[0] == "in_the_wild":
        return name
    return re.sub(r"(_v?\d+|_compact|_ranti)$", "", parts[-1])


def parse_templates(files: Iterable[tuple[str, bytes]]) -> list[Template]:
    """The usable templates among ``(path under the templates folder, YAML bytes)``: exactly one parameter named
    ``prompt``, one slot, no other Jinja (``{% raw %}`` markers are dropped), at most :data:`MAX_CHARS`
    characters. Sorted by name."""
    out: list[Template] = []
    for path, data in files:
        doc = yaml.safe_load(data.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("parameters") != ["prompt"]:
            continue
        text = RAW.sub("", str(doc.get("value", "")))
        if len(SLOT.findall(text)) != 1 or len(text) > MAX_CHARS:
            continue
        if "{%" in text or len(re.findall(r"\{\{", text)) != 1:
            continue
        name = path.removesuffix(".yaml")
        out.append(Template(name, source_of(name), text))
    return sorted(out, key=lambda t: t.name)


def shingles(text: str, k: int = 5) -> frozenset[str]:
    words = re.findall(r"[a-z0-9']+", SLOT.sub(" ", text.lower()))
    return frozenset(" ".join(words[i : i + k]) for i in range(max(1, len(words) - k + 1)))


def families(templates: Sequence[Template], near: float = NEAR_DUPLICATE) -> list[Template]:
    """The templates with ``family`` set: the alphabetically first name stem of each connected group."""
    parent = list(range(len(templates)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    stems = [stem_of(t.name) for t in templates]
    first_with: dict[str, int] = {}
    for i, s in enumerate(stems):
        join(i, first_with.setdefault(s, i))
    sh = [shingles(t.text) for t in templates]
    for i in range(len(templates)):
        for j in range(i + 1, len(templates)):
            inter = len(sh[i] & sh[j])
            if inter and inter / len(sh[i] | sh[j]) >= near:
                join(i, j)
    names: dict[int, str] = {}
    for i in sorted(range(len(templates)), key=lambda i: stems[i]):
        names.setdefault(root(i), stems[i])
    return [Template(t.name, t.source, t.text, names[root(i)]) for i, t in enumerate(templates)]


def hash_key(*parts: str) -> bytes:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()


def family_groups(templates: Sequence[Template]) -> dict[str, str]:
    """``{family: source}``: a family's collection is that of its first template by name (near copies can link
    collections; the family then goes with its first member)."""
    groups: dict[str, str] = {}
    for t in sorted(templates, key=lambda t: t.name):
        groups.setdefault(t.family, t.source)
    return groups


def split_families(groups: dict[str, str], salt: str = "wrapped-v1") -> dict[str, Side]:
    """``{family: side}`` from ``{family: group}``: within each group, families in the order of a hash of their name,
    alternately fit and eval (the first fit), so every group with two families or more is on both sides."""
    side: dict[str, Side] = {}
    for group in sorted(set(groups.values())):
        fams = sorted((f for f, g in groups.items() if g == group), key=lambda f: hash_key(salt, f))
        for i, f in enumerate(fams):
            side[f] = "fit" if i % 2 == 0 else "eval"
    return side


def fetch_templates(cache_dir: str | Path | None = None) -> list[tuple[str, bytes]]:
    """``(path under the templates folder, bytes)`` of every YAML file, from the pinned pyrit wheel (downloaded once
    into the steerlib cache with ``pip download --no-deps``, hash-checked at every read)."""
    folder = cache_root(cache_dir) / "datasets" / "_archives"
    wheel = folder / PYRIT_WHEEL
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            run_client(client_command("pypi", "pyrit", "1.1.0", Path(tmp)), Path(tmp))
            (Path(tmp) / PYRIT_WHEEL).replace(wheel)
    check_sha256(sha256_file(wheel), PYRIT_WHEEL_SHA256, str(wheel))
    with tempfile.TemporaryDirectory() as work:
        members = read_members(wheel, lambda n: n.startswith(TEMPLATES_DIR) and n.endswith(".yaml"), Path(work))
        return sorted((n.removeprefix(TEMPLATES_DIR), data) for n, data in members)


def load_templates(cache_dir: str | Path | None = None) -> list[Template]:
    """The usable pyrit templates with their families."""
    return families(parse_templates(fetch_templates(cache_dir)))


def digest(templates: Sequence[Template]) -> str:
    """A digest of names, families and texts (pins what a run used)."""
    return sha256_of("\x00".join(f"{t.name}\x01{t.family}\x01{t.text}" for t in templates).encode("utf-8"))
