"""Which SAE features fire on each token of a prompt and its response: a lens for reading what steering changed.

    rows = top_features(model, tok, sae, "How do I pick a lock?", generate_tokens=20, steering=cfg)
    for r in rows:
        print(r.position, "P" if r.is_prompt else "G", repr(r.token), r.top)

The activation is read where the SAE reads (``sae.meta.input_site``, unless ``site``/``layer`` are given), after
any steering at that site, so under ``steering`` the features are those of the stream the model really used.
A response is either given (teacher forced: prompt and response in one forward) or generated greedily here, in
which case activations are recorded during generation itself, so policies that tell prompt from generated tokens
act exactly as they did when the tokens were chosen. ``features_over_response`` ranks features over the response's
tokens: the traits behind an answer (in the spirit of "Scaling Monosemanticity", Templeton et al., 2024).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

from steerlib.config import SteeringConfig
from steerlib.extract.activations import left_pad, model_device, pad_id_of, prompt_ids, response_ids, run_stack
from steerlib.hf.hooks import steer
from steerlib.hf.layout import get_layout
from steerlib.hf.recording import record
from steerlib.sites import SITES, parse_site, tl_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from steerlib.plan import TokenizerLike
    from steerlib.sae.base import Sae


class FeatureActivation(NamedTuple):
    feature: int
    activation: float


class TokenFeatures(NamedTuple):
    """One token and its most active features (only active ones, > 0, so possibly fewer than k)."""

    token: str
    position: int
    """Position in the sequence, 0 = first token of the prompt."""
    is_prompt: bool
    top: tuple[FeatureActivation, ...]


class ResponseFeatures(NamedTuple):
    """The features most active over a response's tokens (summed or maxed)."""

    response: str
    """The response's text: as given, or decoded from the tokens that were generated and read."""
    n_tokens: int
    top: tuple[FeatureActivation, ...]


@dataclass(frozen=True)
class _Reading:
    token_ids: list[int]
    """Token id at each reading, ``(N,)``."""
    position_N: Tensor
    is_prompt_N: Tensor
    latents_NF: Tensor


def top_features(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sae: Sae,
    prompt: str,
    *,
    response: str | None = None,
    layer: int | None = None,
    site: str | None = None,
    k: int = 5,
    generate_tokens: int = 0,
    steering: SteeringConfig | None = None,
    chat: bool = True,
) -> list[TokenFeatures]:
    """The top-``k`` features of every token of ``prompt`` (chat-rendered when ``chat``) and of its response.

    ``generate_tokens=n`` generates a greedy response of up to ``n`` tokens (stopping early at EOS) and reads each
    generated token as the model reads it back, so an EOS that ends generation is never read and not listed.
    """
    r = _read(model, tokenizer, sae, prompt, response, layer, site, generate_tokens, steering, chat)
    vals_NK, idx_NK = r.latents_NF.topk(_check_k(k, sae), dim=-1)
    return [
        TokenFeatures(
            token=_decode(tokenizer, [tid]),
            position=int(pos),
            is_prompt=bool(is_p),
            top=_active(vals, idx),
        )
        for tid, pos, is_p, vals, idx in zip(r.token_ids, r.position_N, r.is_prompt_N, vals_NK, idx_NK, strict=True)
    ]


def features_over_response(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sae: Sae,
    prompt: str,
    *,
    response: str | None = None,
    layer: int | None = None,
    site: str | None = None,
    k: int = 10,
    generate_tokens: int = 0,
    steering: SteeringConfig | None = None,
    reduce: Literal["sum", "max"] = "sum",
    chat: bool = True,
) -> ResponseFeatures:
    """The ``k`` features with the largest sum (or max) of activation over the response's tokens.

    Give ``response`` (teacher forced) or ``generate_tokens > 0``; other arguments as :func:`top_features`.
    """
    if response is None and generate_tokens <= 0:
        raise ValueError("no response to read: give response=... or generate_tokens > 0")
    if reduce not in ("sum", "max"):
        raise ValueError(f"unknown reduce={reduce!r}; allowed: sum, max")
    r = _read(model, tokenizer, sae, prompt, response, layer, site, generate_tokens, steering, chat)
    resp_N = ~r.is_prompt_N
    lat = r.latents_NF[resp_N]
    ids = [t for t, keep in zip(r.token_ids, resp_N.tolist(), strict=True) if keep]
    if not ids:
        return ResponseFeatures("", 0, ())
    score_F = lat.sum(0) if reduce == "sum" else lat.amax(0)
    vals, idx = score_F.topk(_check_k(k, sae))
    text = response if response is not None else _decode(tokenizer, ids)
    return ResponseFeatures(text, len(ids), _active(vals, idx))


# -- reading ----------------------------------------------------------------------------------------------------


def sae_site(model: nn.Module, sae: Sae, layer: int | None = None, site: str | None = None) -> str:
    """The TransformerLens name to read: ``site`` (a name, or a short site with ``layer``), else the SAE's own."""
    ref = site if site is not None else sae.meta.input_site
    if ref is None:
        raise ValueError("the SAE does not say where it reads (sae.meta.input_site is None): pass site= and layer=")
    parsed, short = parse_site(ref)
    if short not in SITES:
        raise ValueError(f"unknown site {ref!r}; allowed: {', '.join(SITES)} or blocks.<L>.hook_<site>")
    if site is not None and layer is not None and parsed is not None and parsed != layer:
        raise ValueError(f"site {site!r} names layer {parsed} but layer={layer}")
    chosen = layer if layer is not None else parsed
    if chosen is None:
        raise ValueError(f"site {ref!r} names no layer: pass layer=")
    layout = get_layout(model)
    if not 0 <= chosen < layout.n_layers:
        raise ValueError(f"layer {chosen} out of range: model has {layout.n_layers} layers (0..{layout.n_layers - 1})")
    if sae.d_in != layout.d_model:
        raise ValueError(f"the SAE reads width {sae.d_in} but the model's width is {layout.d_model}")
    return tl_name(chosen, short)


def _read(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sae: Sae,
    prompt: str,
    response: str | None,
    layer: int | None,
    site: str | None,
    generate_tokens: int,
    steering: SteeringConfig | None,
    chat: bool,
) -> _Reading:
    if response is not None and generate_tokens > 0:
        raise ValueError("give either response= (teacher forced) or generate_tokens > 0, not both")
    name = sae_site(model, sae, layer, site)
    p_ids = prompt_ids(tokenizer, prompt, chat)
    if not p_ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens")
    with ExitStack() as stack, torch.no_grad():
        if steering is not None:
            # PreTrainedTokenizerBase.decode is typed to return str | list[str], so it misses TokenizerLike.
            stack.enter_context(steer(model, steering, tokenizer=cast("TokenizerLike", tokenizer)))
        rec = stack.enter_context(record(model, [name]))
        if generate_tokens > 0:
            seq = _generate(model, p_ids, generate_tokens, pad_id_of(tokenizer))
        else:
            seq = p_ids + (response_ids(tokenizer, response) if response is not None else [])
            ids, mask = left_pad([seq], pad_id_of(tokenizer), model_device(model))
            run_stack(model, ids, mask)
    position_N = rec.positions
    # In one teacher-forced forward every token counts as prompt to the recorder; the response starts at len(p_ids).
    is_prompt_N = rec.is_prompt if generate_tokens > 0 else position_N < len(p_ids)
    with torch.no_grad():
        acts_ND = rec[name].to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
        latents_NF = sae.encode(acts_ND).float().cpu()
    return _Reading([seq[int(p)] for p in position_N], position_N, is_prompt_N, latents_NF)


def _generate(model: nn.Module, p_ids: list[int], n: int, pad_id: int) -> list[int]:
    """Greedy tokens after the prompt. One extra token is generated so the n-th one is fed back and read."""
    ids = torch.tensor([p_ids], device=model_device(model))
    out = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n + 1,
        do_sample=False,
        pad_token_id=pad_id,
        return_dict_in_generate=False,
    )
    return [int(t) for t in out[0]]


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    text = tokenizer.decode(ids)
    if not isinstance(text, str):
        raise TypeError(f"tokenizer.decode returned {type(text).__name__}, expected str")
    return text


def _check_k(k: int, sae: Sae) -> int:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(k, sae.d_sae)


def _active(vals_K: Tensor, idx_K: Tensor) -> tuple[FeatureActivation, ...]:
    return tuple(FeatureActivation(int(i), float(v)) for v, i in zip(vals_K, idx_K, strict=True) if v > 0)
