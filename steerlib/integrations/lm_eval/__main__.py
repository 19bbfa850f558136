"""``python -m steerlib.integrations.lm_eval [run] --model steerlib --model_args ... --tasks ...``: lm-eval's own
command line, with the ``steerlib`` model registered first.

lm-eval 0.4.13 finds models only in its own registry (no entry-point discovery, and ``--include_path`` adds tasks,
not models), so the model module must be imported in the process that runs the eval; this is that process. From
Python, ``import steerlib.integrations.lm_eval.model`` before ``lm_eval.simple_evaluate(model="steerlib", ...)``.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import steerlib.integrations.lm_eval.model  # noqa: F401  # registers --model steerlib

    cli_evaluate()


if __name__ == "__main__":
    main()
