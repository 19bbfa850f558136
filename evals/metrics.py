"""Rates with confidence intervals, and agreement between two judges.

- Wilson score interval for a binomial proportion (Wilson, 1927; recommended over the normal approximation for small
  n and rates near 0 or 1 by Brown, Cai & DasGupta, Statistical Science 2001).
- Cohen's kappa (Cohen, 1960): agreement between two judges corrected for the agreement expected by chance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054
"""The 97.5% quantile of the standard normal."""


@dataclass(frozen=True)
class Rate:
    """``k`` successes out of ``n`` with a Wilson 95% interval ``[low, high]``."""

    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    def as_json(self) -> dict[str, float | int]:
        """The rate, its interval and counts as JSON-ready numbers (the form recipe reports use)."""
        return {"rate": self.value, "low": self.low, "high": self.high, "k": self.k, "n": self.n}

    def __str__(self) -> str:
        if not self.n:
            return "n/a (n=0)"
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] ({self.k}/{self.n})"


def wilson(k: int, n: int, z: float = Z95) -> Rate:
    """Wilson score interval; ``n == 0`` gives NaN bounds."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Rate(0, 0, math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k=0 or k=n the bound is exactly 0 or 1; clamp rounding noise.
    return Rate(k, n, 0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def rate(flags: Sequence[bool]) -> Rate:
    return wilson(sum(flags), len(flags))


@dataclass(frozen=True)
class Agreement:
    n: int
    """Items both judges gave a verdict on."""
    raw: float
    """Fraction of those items where the verdicts agree."""
    kappa: float
    """Cohen's kappa; NaN when chance agreement is 1 (both judges constant and equal), where it is undefined."""


def agreement(a: Sequence[bool | None], b: Sequence[bool | None]) -> Agreement:
    """Raw agreement and Cohen's kappa over the items where neither verdict is ``None``."""
    if len(a) != len(b):
        raise ValueError(f"judges gave {len(a)} and {len(b)} verdicts; they must judge the same items")
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    n = len(pairs)
    if n == 0:
        return Agreement(0, math.nan, math.nan)
    observed = sum(x == y for x, y in pairs) / n
    pa, pb = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    kappa = math.nan if expected == 1 else (observed - expected) / (1 - expected)
    return Agreement(n, observed, kappa)
