"""evals: refusal benchmarks, robustness to refusal-direction ablation, capability cost and SAE quality for steerlib.

Modules, one concept each:

- ``datasets`` / ``fetch``: registry-packaged benchmarks (pinned, sha256-checked, cached), user prompt files, and the
  hash-based train / held-out split; ``benign_text``: fixed paragraphs for capability checks.
- ``targets``: the model in process under a steering config, or any OpenAI-compatible endpoint with per-request
  steering; ``loopback``: a minimal local OpenAI-compatible server for tests.
- ``judges``: substring and LLM refusal judges; ``metrics``: Wilson intervals and judge agreement;
  ``coherence``: degeneracy scores; ``capability``: CE / KL and MMLU; ``sae_quality``: L0, FVU, dead latents,
  CE loss recovered.
- ``controls`` / ``arms``: sweeps, same-norm random-vector controls; ``attack``: the refusal-direction ablation attack
  (ReFAT, arXiv 2409.20089); ``feature_report``: per-token feature-ablation HTML.
- ``runner`` / ``report`` / ``cli``: run an eval, write JSONL, markdown, JSON and PNG plots (``python -m evals``).
"""
