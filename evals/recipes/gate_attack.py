"""A white-box attack on a detector gate: greedy coordinate gradient (GCG, Zou et al., arXiv 2307.15043) over a
string of adversarial tokens placed before (``prefix``) or after (``suffix``) the request, minimising the gate's
margin ``score - above`` on the embedded model, as the plugin pools it (:class:`OfflineGate`).

Each step takes the gradient of the margin with respect to the one-hot adversarial tokens, draws ``batch``
candidates that each swap one position for one of its ``top_k`` most promising tokens (printable ASCII tokens
only), and keeps the best candidate. The attack succeeds when the margin is at most 0 for the token ids *and* for
the decoded text re-tokenized as a server would see it. Under causal attention, a suffix cannot change the
activations of the tokens before it: against a max-pooled gate a suffix can only succeed if the request alone
does not fire it, and a prefix is the attack that matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from evals.recipes.token_acts import render, run_layers
from evals.recipes.wrapped_select import OfflineGate
from steerlib.hf.layout import get_layout

Where = Literal["prefix", "suffix"]
MARK = "\x00ADV\x00"


@dataclass(frozen=True)
class GcgSettings:
    n_adv: int = 16
    steps: int = 100
    top_k: int = 64
    batch: int = 16
    where: Where = "prefix"
    seed: int = 0


@dataclass
class AttackResult:
    request: str
    margins: list[float] = field(default_factory=list)
    """The best margin after each step (index 0: before any step)."""
    adversarial: str = ""
    success_step: int | None = None
    """First step whose best candidate passes the gate (ids and re-tokenized text), None if none did."""


def pieces(tok: Any, request: str, where: Where) -> tuple[list[int], list[int]]:
    """Token ids of the rendered prompt before and after the adversarial slot."""
    content = f"{MARK} {request}" if where == "prefix" else f"{request} {MARK}"
    before, after = render(tok, [{"role": "user", "content": content}]).split(MARK)
    enc = tok([before, after], add_special_tokens=False)["input_ids"]
    return list(enc[0]), list(enc[1])


def allowed_tokens(tok: Any, vocab: int) -> Tensor:
    """``(V,)`` True for tokens that decode to printable ASCII (no special or control tokens)."""
    special = set(getattr(tok, "all_special_ids", []))
    ok = torch.zeros(vocab, dtype=torch.bool, device="cpu")
    for i in range(vocab):
        s = tok.decode([i])
        ok[i] = i not in special and bool(s) and s.isascii() and s.isprintable()
    return ok


def margins(model: nn.Module, gate: OfflineGate, ids_BT: Tensor) -> Tensor:
    """``(B,)`` the gate's ``score - above`` for each row (rows of equal length, no padding)."""
    x = run_layers(model, ids_BT, torch.ones_like(ids_BT), [gate.layer])[gate.layer]
    return _pooled(gate, x) - gate.above


def _pooled(gate: OfflineGate, x_BTD: Tensor) -> Tensor:
    if gate.window > 1:  # rows are unpadded and of equal length: window means along T
        c = torch.cat([torch.zeros_like(x_BTD[:, :1]), x_BTD.float().cumsum(1)], dim=1)
        t = torch.arange(x_BTD.shape[1], device=x_BTD.device)
        lo = (t - gate.window + 1).clamp_min(0)
        x_BTD = (c[:, t + 1] - c[:, lo]) / (t + 1 - lo)[None, :, None]
    if gate.pooled_mean:
        return gate.probe.scores(x_BTD.float().mean(1))
    s_BT = gate.probe.scores(x_BTD.reshape(-1, x_BTD.shape[-1])).reshape(x_BTD.shape[:2])
    if gate.aggregate == "max":
        return s_BT.max(1).values
    return s_BT[:, -1] if gate.aggregate == "last" else s_BT.mean(1)


def _gradient(model: nn.Module, gate: OfflineGate, before: Tensor, adv: Tensor, after: Tensor) -> Tensor:
    """``(n_adv, V)`` gradient of the margin with respect to the one-hot adversarial tokens."""
    emb = get_layout(model).base.get_input_embeddings().weight  # type: ignore[operator]
    one_hot = torch.nn.functional.one_hot(adv, emb.shape[0]).to(emb.dtype).requires_grad_()
    embeds = torch.cat([emb[before], one_hot @ emb, emb[after]])[None]
    x = run_layers(
        model, None, torch.ones(1, embeds.shape[1], dtype=torch.long, device="cpu"), [gate.layer], embeds_BTD=embeds
    )
    _pooled(gate, x[gate.layer]).sum().backward()
    assert one_hot.grad is not None
    return one_hot.grad


def passes_as_text(model: nn.Module, tok: Any, gate: OfflineGate, request: str, adv_text: str, where: Where) -> bool:
    content = f"{adv_text} {request}" if where == "prefix" else f"{request} {adv_text}"
    ids = tok(render(tok, [{"role": "user", "content": content}]), add_special_tokens=False)["input_ids"]
    return bool(margins(model, gate, torch.tensor([ids], device="cpu"))[0] <= 0)


def gcg(model: nn.Module, tok: Any, gate: OfflineGate, request: str, ok_V: Tensor, s: GcgSettings) -> AttackResult:
    """Attack one request (see the module docstring); stops early at the first success."""
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    before_l, after_l = pieces(tok, request, s.where)
    before, after = torch.tensor(before_l, device="cpu"), torch.tensor(after_l, device="cpu")
    adv = torch.tensor(tok(" !" * s.n_adv, add_special_tokens=False)["input_ids"][: s.n_adv], device="cpu")
    if len(adv) < s.n_adv or not bool(ok_V[adv].all()):  # "!" is not a token: start from the first allowed one
        adv = torch.full((s.n_adv,), int(ok_V.nonzero()[0]), device="cpu")
    out = AttackResult(request)
    best = float(margins(model, gate, torch.cat([before, adv, after])[None])[0])
    out.margins.append(best)
    if best <= 0 and passes_as_text(model, tok, gate, request, tok.decode(adv), s.where):
        out.adversarial, out.success_step = tok.decode(adv), 0
        return out
    for step in range(1, s.steps + 1):
        grad = _gradient(model, gate, before, adv, after)
        grad = grad.masked_fill(~ok_V[None, : grad.shape[1]], torch.inf)
        top = (-grad).topk(s.top_k, dim=1).indices
        pos = torch.randint(0, len(adv), (s.batch,), generator=gen, device="cpu")
        pick = top[pos, torch.randint(0, s.top_k, (s.batch,), generator=gen, device="cpu")]
        cands = adv.repeat(s.batch, 1)
        cands[torch.arange(s.batch, device="cpu"), pos] = pick
        rows = torch.cat([before.repeat(s.batch, 1), cands, after.repeat(s.batch, 1)], dim=1)
        m = margins(model, gate, rows)
        i = int(m.argmin())
        adv, best = cands[i], float(m[i])
        out.margins.append(best)
        if best <= 0:
            text = tok.decode(adv)
            if passes_as_text(model, tok, gate, request, text, s.where):
                out.adversarial, out.success_step = text, step
                break
    out.adversarial = out.adversarial or tok.decode(adv)
    return out


def success_curve(results: list[AttackResult], budgets: tuple[int, ...] = (0, 10, 25, 50, 100)) -> dict[int, int]:
    """How many attacks had succeeded within each step budget."""
    return {b: sum(r.success_step is not None and r.success_step <= b for r in results) for b in budgets}
