"""``python -m evals.autointerp``: build a feature index, explain and score latents, summarise the scores.

    python -m evals.autointerp index --sae /tmp/ref4/out/sae --out /tmp/autointerp/ref4 --tokens 200000
    python -m evals.autointerp explain --index /tmp/autointerp/ref4 --endpoint http://127.0.0.1:8011/v1 \\
        --model SmolLM2-135M-Instruct --features 0-199
    python -m evals.autointerp summary --index /tmp/autointerp/ref4
"""

from __future__ import annotations

import sys

from evals.autointerp.cli import main

if __name__ == "__main__":
    sys.exit(main())
