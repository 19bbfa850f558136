"""The ``steerlib`` model of lm-evaluation-harness: an in-process HF model, every request run under one steering config.

    python -m steerlib.integrations.lm_eval run --model steerlib \\
        --model_args pretrained=SmolLM2-135M-Instruct,steering=steer.yaml,device=cpu,dtype=float32 --tasks ...

``pretrained`` is anything :func:`steerlib.load_model` takes (a folder, a ``.gguf`` file, a hub id, or
``SmolLM2-135M-Instruct`` for the embedded model); ``steering`` a config file (omit it for the unsteered baseline).

Token policies mean what they mean in generation (see :mod:`steerlib.integrations.scoring`): in ``loglikelihood``
the context is the prompt and the continuation is generated tokens; ``loglikelihood_rolling`` scores a document as
generated text after the prefix token (each later window's context is its prompt); ``generate_until`` generates
from the context with :func:`~steerlib.integrations.generation.generate_from_ids` (``refuse`` detectors answer there).
Contexts are tokenized as lm-eval's ``hf`` model does (the tokenizer's special tokens, unless the text already
starts with BOS), so an unsteered run scores what ``--model hf`` scores.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm.auto import tqdm

from steerlib.integrations.generation import generate_from_ids
from steerlib.integrations.models import SteeringArg, check_steering, shared_model, steering_config
from steerlib.integrations.scoring import ContinuationScore, TokenPair, score_continuations

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
"""Context window when neither ``max_length`` nor the model's config gives one."""
_LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "seq_length")


@register_model("steerlib")
class SteerlibLM(TemplateLM):
    """lm-eval's ``LM`` interface over a steerlib-steered HF model.

    ``batch_size`` is a number of requests per forward (``auto`` is not supported); ``max_batch_size``, which lm-eval
    passes along, only matters with ``auto`` and is ignored. ``max_length`` defaults to the model's context size."""

    def __init__(
        self,
        pretrained: str | None = None,
        steering: SteeringArg = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        self.batch_size = _batch_size(batch_size)
        self.shared = shared_model(None if pretrained is None else str(pretrained), str(device), str(dtype))
        self.steering = steering_config(steering)
        check_steering(self.shared, self.steering)
        self.tokenizer = self.shared.tokenizer
        self._max_length = int(max_length) if max_length is not None else _model_max_length(self.shared.model)
        self.max_gen_toks = int(max_gen_toks)
        self._device = str(next(self.shared.model.parameters()).device)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> SteerlibLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> SteerlibLM:
        """``--model_args`` win over the command line's settings: lm-eval passes ``--device`` (default ``cuda:0``),
        ``--batch_size`` and ``--max_batch_size`` along, so ``device=cpu`` in the model args would otherwise clash."""
        settings = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**(settings | arg_dict))

    # -- tokenization (as lm-eval's hf model) -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos: int = self.tokenizer.eos_token_id
        return eos

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        bos_text = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            add_special_tokens = False  # already rendered with BOS (a chat template): do not add a second
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids: list[int] = self.tokenizer.encode(string, **extra)
        return ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text: str = self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text

    # -- requests -----------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        scores = self._score([self._fit(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), score in zip(requests, scores, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, tuple(score))
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(s.logprob for s in self._score(windows, disable_tqdm))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one generate call per batch of requests with the same settings
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            settings = requests[indices[0]].args[1]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], settings)
                for i, text in zip(chunk, texts, strict=True):
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
        return out

    # -- steered model calls ------------------------------------------------------------------------------------

    def _fit(self, ctx: list[int], cont: list[int]) -> TokenPair:
        """Left-truncate the context so that the tokens fed (context and all but the last continuation token) fit
        ``max_length``, as lm-eval's hf model does."""
        if len(cont) > self.max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
        return ctx[-(self.max_length + 1 - len(cont)) :], cont

    def _score(self, pairs: list[TokenPair], disable_tqdm: bool = True) -> list[ContinuationScore]:
        """Scores in request order; batches are cut from the requests sorted longest first (less padding)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scores: dict[int, ContinuationScore] = {}
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="steerlib loglikelihood", disable=disable_tqdm or len(starts) < 2):
            chunk = order[start : start + self.batch_size]
            with self.shared.lock:
                got = score_continuations(
                    self.shared.model, self.tokenizer, [pairs[i] for i in chunk], self.steering, batch_size=len(chunk)
                )
            scores |= dict(zip(chunk, got, strict=True))
        return [scores[i] for i in range(len(pairs))]

    def _generate(self, contexts: list[str], settings: dict[str, Any]) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(dict(settings), self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tokenizer.decode(self.eot_token_id))
        max_new = int(kwargs.pop("max_gen_toks"))
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks {max_new} must be below the model's max_length {self.max_length}")
        if not kwargs.get("do_sample"):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("do_sample", "temperature", "top_p", "top_k")}
        prompts = [self.tok_encode(c)[-(self.max_length - max_new) :] for c in contexts]
        with self.shared.lock:
            gens = generate_from_ids(
                self.shared.model, self.tokenizer, prompts, self.steering, max_new_tokens=max_new, stop=until, **kwargs
            )
        for g in gens:
            if g.refused_by is not None:
                log.info("steering detector %s answered instead of the model", g.refused_by)
        return [g.text for g in gens]


def _batch_size(value: int | str) -> int:
    if isinstance(value, str) and not value.isdigit():
        raise ValueError(f"batch_size {value!r}: the steerlib model takes a number (no 'auto')")
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return size


def _model_max_length(model: Any) -> int:
    for name in _LENGTH_FIELDS:
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH
