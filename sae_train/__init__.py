"""sae_train: train SAEs and transcoders on a model's activations, saved in steerlib's format.

Modules, one concept each: ``fetch`` (pinned data out of registry packages, hash-checked; also the evals'
benchmarks), ``corpora`` (registry-packaged text), ``data`` (sources, packing, held-out
split), ``activations`` (harvest through steerlib's recording, shuffle buffer, memory-mapped cache), ``batches``
(deterministic batches), ``models/`` (one training architecture per file), ``normalize``, ``schedule``, ``trainer``,
``dist`` (data parallel), ``checkpoint``, ``metrics`` (held-out metrics via steerlib's ``replace`` op), ``export``
(SAELens layout), ``config`` and ``pipeline`` (``python -m sae_train CONFIG.yaml``).
"""
