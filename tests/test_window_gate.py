"""`aggregate: window_max`: the best-scoring window of `w` consecutive prompt tokens, read in one step or in chunks."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from steerlib.config import Condition
from steerlib.mlp_probe import MlpProbe
from steerlib.policy import Gate, LatentCache
from steerlib.run_state import GateState
from steerlib.tokens import TokenBatch

D = 8
LENS = [11, 3, 7]  # row 1 is shorter than the window


def naive(x_TD: Tensor, w: int, score: object) -> float:
    """The oracle: every window's mean, written out."""
    means = torch.stack([x_TD[max(0, t - w + 1) : t + 1].mean(0) for t in range(x_TD.shape[0])])
    return float(score(means).max())  # type: ignore[operator]


def run(gate: Gate, xs: list[Tensor], chunks: list[int]) -> Tensor:
    """Feed every row's prompt through ``gate`` in steps of at most ``chunks[i]`` tokens per row (vLLM's chunked
    prefill: each step has one contiguous chunk per row); returns the decided prompt scores."""
    st = GateState.empty(gate, len(xs), D, torch.device("cpu"))
    prompt_len = torch.tensor([x.shape[0] for x in xs])
    done = [0] * len(xs)
    step = 0
    while any(d < x.shape[0] for d, x in zip(done, xs, strict=True)):
        rows, pos, acts = [], [], []
        for r, x in enumerate(xs):
            take = min(chunks[step % len(chunks)], x.shape[0] - done[r])
            rows += [r] * take
            pos += list(range(done[r], done[r] + take))
            acts.append(x[done[r] : done[r] + take])
        new = torch.tensor([d == 0 for d in done])
        tb = TokenBatch(torch.tensor(rows), torch.tensor(pos), torch.ones(len(rows), dtype=torch.bool), prompt_len,
                        None, new)  # fmt: skip
        x_ND = torch.cat(acts)
        gate.mask(x_ND, LatentCache(x_ND), tb, st)
        done = [min(d + chunks[step % len(chunks)], x.shape[0]) for d, x in zip(done, xs, strict=True)]
        step += 1
    return st.decided()[1]


@pytest.mark.parametrize("kind", ["vector", "mlp"])
@pytest.mark.parametrize("chunks", [[100], [1], [3, 2, 5], [4]])
def test_window_max_equals_the_oracle_whatever_the_chunking(kind: str, chunks: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, D, generator=g) * 2 for n in LENS]
    w = 4
    if kind == "vector":
        v = torch.randn(D, generator=g)
        score = lambda m: m @ v  # noqa: E731
        gate = Gate(lambda x, c: c.x_in_ND @ v, 0.0, None, "prompt", "window_max", window=w)
    else:
        probe = MlpProbe(torch.randn(5, D, generator=g), torch.randn(5, generator=g), torch.randn(5, generator=g),
                         torch.tensor(0.1))  # fmt: skip
        score = probe.scores
        gate = Gate(lambda x, c: probe.scores(c.x_in_ND), 0.0, None, "prompt", "window_max", pooled=probe.scores,
                    window=w)  # fmt: skip
    got = run(gate, xs, chunks)
    want = torch.tensor([naive(x, w, score) for x in xs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_short_span_in_a_long_prompt_is_found_where_the_mean_misses_it() -> None:
    v = torch.zeros(D)
    v[0] = 1.0
    x = torch.zeros(40, D)
    x[20:24, 0] = 1.0  # a 4-token "request" inside 40 tokens of "template"
    window = Gate(lambda x_, c: c.x_in_ND @ v, 0.5, None, "prompt", "window_max", window=4)
    mean = Gate(lambda x_, c: c.x_in_ND @ v, 0.5, None, "prompt", "mean")
    assert run(window, [x], [7]).tolist() == [1.0]
    assert run(mean, [x], [7]).tolist() == [pytest.approx(0.1)]


def test_window_needs_window_max_and_prompt_scope() -> None:
    ok = Condition.model_validate({"vector": [1.0], "above": 0, "scope": "prompt", "aggregate": "window_max",
                                   "window": 16})  # fmt: skip
    assert ok.window == 16
    for bad in ({"aggregate": "window_max"}, {"aggregate": "max", "window": 4},
                {"aggregate": "window_max", "window": 4, "scope": "token"}):  # fmt: skip
        with pytest.raises(ValidationError, match="window"):
            Condition.model_validate({"vector": [1.0], "above": 0, "scope": "prompt", **bad})
