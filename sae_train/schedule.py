"""Learning-rate and sparsity-coefficient schedules (pure functions of the step, so a resumed run agrees).

LR: linear warmup, constant, then linear decay to zero over the final fraction of steps (Gao et al. 2406.04093
decay the LR at the end; Conerly et al. 2024 warm the L1 coefficient up from zero).
"""

from __future__ import annotations


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Multiplier of the base LR at ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def sparsity_factor(step: int, warmup: int) -> float:
    """Multiplier of the sparsity coefficient: ramps from ~0 to 1 over ``warmup`` steps."""
    return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)
