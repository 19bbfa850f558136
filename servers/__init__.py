"""servers: an OpenAI-compatible HTTP endpoint for steered generation, built on steerlib's HF backend.

``python -m servers`` starts it (see ``servers/README.md``). The parts: ``settings`` (flags, env, YAML),
``presets`` (the folder of steering presets), ``steering`` (a request's ``steering`` field to configs),
``engine`` + ``decode`` + ``sampling`` (dynamic batching with per-row steering), ``routes_*`` and ``app``.
"""
