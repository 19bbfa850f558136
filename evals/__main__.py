"""``python -m evals``: refusal evals, capability cost, SAE quality and feature-ablation reports from the command line.

    python -m evals datasets                                   # the registered benchmarks
    python -m evals run --harmful harmbench --harmless harmless_probes --limit 32 \\
        --config refusal=steer/refusal.yaml --coefficients 2,4,8 --random-control --attack --capability
    python -m evals run --endpoint http://127.0.0.1:8000/v1 --endpoint-model smollm2 --preset refusal ...
    python -m evals sae-quality --sae saes/l12 --layer 12
    python -m evals feature-report --sae saes/l12 --layer 12 --feature 123 --text "..." --out f123.html

See ``python -m evals run --help`` for every flag, and :mod:`evals.cli` for what ``run`` writes.
"""

from __future__ import annotations

import sys

from evals.cli import main

if __name__ == "__main__":
    sys.exit(main())
