"""steerlib inside the eval tools people already run: an Inspect AI model provider and an lm-evaluation-harness model.

* ``steerlib.integrations.inspect_ai``: the ``steerlib/<model>`` provider (registered through Inspect's
  ``inspect_ai`` entry point), steering given as a model arg (``-M steering=steer.yaml``).
* ``steerlib.integrations.lm_eval``: the ``steerlib`` model of lm-eval (``--model steerlib --model_args
  pretrained=...,steering=steer.yaml``), run through ``python -m steerlib.integrations.lm_eval``.

Both load models in-process with :func:`steerlib.load_model` and steer with :func:`steerlib.steer`, so a config means
there what it means in ``steerlib.hf.generate.generate``. Nothing here is imported by ``import steerlib``: Inspect and
lm-eval are imported only by their own subpackages (``pip install steerlib[evaltools]``).
"""
