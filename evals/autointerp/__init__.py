"""Automatic explanations of SAE latents and their scoring (detection and fuzzing).

Pipeline: :mod:`evals.autointerp.index` (statistics and max-activating contexts over held-out text),
:mod:`evals.autointerp.explain` (explainer prompt over the contexts, judge calls through any OpenAI-compatible
endpoint, cached and resumable), :mod:`evals.autointerp.score` (detection and fuzzing, Paulo et al., arXiv
2410.13928, after the explain-simulate-score loop of Bills et al., "Language models can explain neurons in language
models", OpenAI 2023) and :mod:`evals.autointerp.summary`.
"""
