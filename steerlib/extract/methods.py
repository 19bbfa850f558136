"""Steering vectors from contrasting activations, and from an SAE's decoder.

- :func:`diff_of_means`: mean activation over positive examples minus the mean over negative ones (activation
  addition, Turner et al., arXiv 2308.10248; the refusal direction, Arditi et al., arXiv 2406.11717, is this at the
  last prompt token).
- :func:`contrastive`: contrastive activation addition (CAA, Rimsky et al., arXiv 2312.06681): one prompt, a positive
  and a negative completion, teacher forced; the vector is the mean over pairs of the paired difference.
- :func:`pca_direction`: the first principal component of the same paired differences (representation reading,
  Zou et al., arXiv 2310.01405; compared with mean differences by Im & Li, arXiv 2502.02716).
- :func:`sae_decoder_row`: an SAE latent's decoder direction (Templeton et al., "Scaling Monosemanticity", 2024).

Each returns a :class:`~steerlib.vectors.SteeringVector` whose metadata says how it was made. ``layers`` given as an
int gives a layer-independent vector (metadata ``layer``); a sequence of ints gives one vector per layer
(``SteeringVector.per_layer``, metadata ``layers``); a config naming those layers applies each layer's own
vector, and names a missing layer as an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from steerlib.extract.activations import (
    Span,
    pad_id_of,
    prompt_span,
    resolve_layers,
    response_span,
    span_means,
)
from steerlib.sites import parse_site
from steerlib.vectors import SteeringVector, metadata_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from steerlib.sae.base import Sae

At = Literal["last_prompt_token", "response_mean"]
Example = str | tuple[str, str]
"""A prompt, or a ``(prompt, response)`` pair for ``at="response_mean"``."""
Pair = tuple[str, str, str]
"""``(prompt, positive_completion, negative_completion)``."""


def diff_of_means(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    positive: Sequence[Example],
    negative: Sequence[Example],
    *,
    layers: int | Sequence[int],
    site: str = "resid_post",
    at: At = "last_prompt_token",
    chat: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> SteeringVector:
    """``mean(positive) - mean(negative)`` of the activation at ``site`` of each layer.

    ``at="last_prompt_token"``: each example is a prompt and its last token's activation is used (with ``chat``,
    the last token of the assistant header the template appends). ``at="response_mean"``: each example is a
    ``(prompt, response)`` pair run in one teacher-forced forward, and its activation is the mean over the
    response's tokens; every example weighs the same whatever its length.
    """
    if not positive or not negative:
        raise ValueError(f"need positive and negative examples, got {len(positive)} and {len(negative)}")
    layer_list = resolve_layers(model, layers, site)
    pos = [_span(tokenizer, e, at, chat, f"positive[{i}]") for i, e in enumerate(positive)]
    neg = [_span(tokenizer, e, at, chat, f"negative[{i}]") for i, e in enumerate(negative)]
    means = span_means(
        model, pos + neg, layer_list, site, pad_id=pad_id_of(tokenizer), batch_size=batch_size, progress=progress
    )
    vectors = {layer: m[: len(pos)].mean(0) - m[len(pos) :].mean(0) for layer, m in means.items()}
    counts = {"n_examples": len(pos) + len(neg), "n_positive": len(pos), "n_negative": len(neg)}
    return _package(vectors, layers, model, site, method="diff_of_means", at=at, chat=chat, **counts)


def contrastive(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    *,
    layers: int | Sequence[int],
    site: str = "resid_post",
    chat: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> SteeringVector:
    """CAA: the mean over pairs of (mean activation over the positive completion's tokens − same for the negative).

    In the paper the completions are answer letters (``"(A"`` / ``"(B"``). Tokens the two completions share
    (the ``"("``) have identical activations and add nothing to the difference, but they do count in each mean,
    so a shared prefix scales the vector down without turning it.
    """
    diffs = _pair_differences(model, tokenizer, pairs, layers, site, chat, batch_size, progress)
    vectors = {layer: d.mean(0) for layer, d in diffs.items()}
    return _package(vectors, layers, model, site, method="caa", chat=chat, n_examples=len(pairs), n_pairs=len(pairs))


def pca_direction(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    *,
    layers: int | Sequence[int],
    site: str = "resid_post",
    center: bool = True,
    chat: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> SteeringVector:
    """The first principal component of the paired differences (inputs as :func:`contrastive`).

    See :func:`principal_direction` for the sign, the scaling and ``center``.
    """
    diffs = _pair_differences(model, tokenizer, pairs, layers, site, chat, batch_size, progress)
    vectors = {layer: principal_direction(d, center=center) for layer, d in diffs.items()}
    n = len(pairs)
    return _package(vectors, layers, model, site, method="pca", center=center, chat=chat, n_examples=n, n_pairs=n)


def principal_direction(diffs_ND: Tensor, *, center: bool = True) -> Tensor:
    """First principal component ``u`` of ``diffs_ND``, as ``(m · u) u`` with ``m`` the mean difference.

    The sign is chosen so that ``m · u >= 0``, and the length is the mean difference's projection on ``u``: the
    result is the part of the CAA vector that lies along the component, so it has the CAA vector's strength
    along that axis and equals it when every difference points the same way.

    ``center=True`` is classic PCA (of ``diffs - m``; Zou et al.'s representation reading); it needs the
    differences to vary. ``center=False`` takes the top right-singular vector of the raw differences, the
    direction of largest mean squared projection, which is defined even when all differences are equal.
    """
    n = diffs_ND.shape[0]
    if n < 2:
        raise ValueError(f"a principal component needs at least 2 pairs, got {n}")
    x = diffs_ND.double()
    mean_D = x.mean(0)
    data = x - mean_D if center else x
    _, s, vh = torch.linalg.svd(data, full_matrices=False)
    if float(s[0]) <= 1e-9 * max(float(x.abs().max()), 1e-30):
        raise ValueError(
            "the paired differences do not vary, so they have no principal component; use contrastive() or center=False"
        )
    u = vh[0]
    proj = mean_D @ u
    if proj < 0:
        u, proj = -u, -proj
    return (proj * u).float()


def sae_decoder_row(sae: Sae, feature: int) -> SteeringVector:
    """The decoder direction of latent ``feature``: ``sae.W_dec[feature]``, in the space the SAE writes to.

    The metadata names the feature and the SAE's output site (``sae_site``) and, when that is a TransformerLens
    name, its ``layer`` and ``site``.
    """
    if not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature {feature} out of range: the SAE has {sae.d_sae} latents (0..{sae.d_sae - 1})")
    meta: dict[str, object] = {
        "method": "sae_decoder_row",
        "feature": feature,
        "sae_architecture": sae.meta.architecture,
        "d_sae": sae.d_sae,
    }
    sae_site = sae.meta.output_site or sae.meta.input_site
    if sae_site is not None:
        layer, short = parse_site(sae_site)
        meta.update(sae_site=sae_site, site=short)
        if layer is not None:
            meta["layer"] = layer
    if sae.meta.model is not None:
        meta["model"] = sae.meta.model
    return SteeringVector.single(sae.W_dec[feature], **metadata_json(meta))


# -- helpers ----------------------------------------------------------------------------------------------------


def _span(tokenizer: PreTrainedTokenizerBase, example: Example, at: At, chat: bool, where: str) -> Span:
    if at == "last_prompt_token":
        if not isinstance(example, str):
            raise ValueError(f"{where}: at='last_prompt_token' takes prompts (str), got {type(example).__name__}")
        return prompt_span(tokenizer, example, chat)
    if at == "response_mean":
        if isinstance(example, str) or len(example) != 2:
            raise ValueError(f"{where}: at='response_mean' takes (prompt, response) pairs, got {example!r}")
        return response_span(tokenizer, example[0], example[1], chat, where)
    raise ValueError(f"unknown at={at!r}; allowed: last_prompt_token, response_mean")


def _pair_differences(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    layers: int | Sequence[int],
    site: str,
    chat: bool,
    batch_size: int,
    progress: bool,
) -> dict[int, Tensor]:
    """``{layer: (N, D)}``: per pair, mean over the positive completion minus mean over the negative one."""
    if not pairs:
        raise ValueError("need at least one (prompt, positive, negative) pair")
    layer_list = resolve_layers(model, layers, site)
    spans: list[Span] = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or len(pair) != 3:
            raise ValueError(f"pairs[{i}]: expected (prompt, positive_completion, negative_completion), got {pair!r}")
        prompt, good, bad = pair
        spans.append(response_span(tokenizer, prompt, good, chat, f"pairs[{i}] positive"))
        spans.append(response_span(tokenizer, prompt, bad, chat, f"pairs[{i}] negative"))
    means = span_means(
        model, spans, layer_list, site, pad_id=pad_id_of(tokenizer), batch_size=batch_size, progress=progress
    )
    return {layer: m[0::2] - m[1::2] for layer, m in means.items()}


def _package(
    vectors: dict[int, Tensor], layers: int | Sequence[int], model: nn.Module, site: str, **meta: object
) -> SteeringVector:
    name = getattr(getattr(model, "config", None), "name_or_path", None) or ""
    common: dict[str, object] = {"model": name, "site": site, **meta}
    if isinstance(layers, int):
        return SteeringVector.single(vectors[layers], **metadata_json({**common, "layer": layers}))
    return SteeringVector.per_layer(vectors, **metadata_json({**common, "layers": list(vectors)}))
