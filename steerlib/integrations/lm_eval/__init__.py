"""lm-evaluation-harness model ``steerlib``: :mod:`.model` registers it (importing it imports lm_eval);
``python -m steerlib.integrations.lm_eval`` is lm-eval's command line with the model registered."""
