"""Tiny seeded random causal LMs, one per supported architecture, for CPU tests.

Every model has hidden size 64, 4 attention heads (2 key/value heads where the architecture has
grouped-query attention), MLP width 128, a 128-token vocabulary and 256 positions. Token ids:
pad 0, bos 1, eos 127 (the last id, so greedy decoding of random weights rarely stops early).
Dropout is zero and the model is in eval mode, so two forwards of the same input are identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
VOCAB = 128
MAX_POSITIONS = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, VOCAB - 1

_TOKENS: dict[str, Any] = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}

# The shape shared by the Llama family (names as in LlamaConfig).
_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "intermediate_size": INTERMEDIATE,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    **_TOKENS,
}

ConfigFactory = Callable[[int], PretrainedConfig]


def _config(model_type: str, **kwargs: Any) -> PretrainedConfig:
    config: PretrainedConfig = CONFIG_MAPPING[model_type](**kwargs)
    return config


_CONFIGS: dict[str, ConfigFactory] = {
    "llama": lambda n: _config("llama", num_hidden_layers=n, **_LLAMA_LIKE),
    # Window wider than any test sequence: sliding attention is exercised without changing the result.
    "mistral": lambda n: _config("mistral", num_hidden_layers=n, sliding_window=MAX_POSITIONS, **_LLAMA_LIKE),
    "qwen2": lambda n: _config("qwen2", num_hidden_layers=n, **_LLAMA_LIKE),
    "qwen3": lambda n: _config("qwen3", num_hidden_layers=n, head_dim=HEAD_DIM, **_LLAMA_LIKE),
    "gemma": lambda n: _config("gemma", num_hidden_layers=n, head_dim=HEAD_DIM, **_LLAMA_LIKE),
    "gemma2": lambda n: _config(
        "gemma2",
        num_hidden_layers=n,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=MAX_POSITIONS,
        **_LLAMA_LIKE,
    ),
    # gemma3_text is Gemma3ForCausalLM, the text-only model (Gemma 3 270M/1B are built this way).
    "gemma3": lambda n: _config(
        "gemma3_text",
        num_hidden_layers=n,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=MAX_POSITIONS,
        **_LLAMA_LIKE,
    ),
    "gpt2": lambda n: _config(
        "gpt2",
        n_layer=n,
        n_embd=HIDDEN,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        vocab_size=VOCAB,
        n_positions=MAX_POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **_TOKENS,
    ),
    "gpt_neox": lambda n: _config(
        "gpt_neox",
        num_hidden_layers=n,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        **_TOKENS,
    ),
    "phi3": lambda n: _config(
        "phi3",
        num_hidden_layers=n,
        original_max_position_embeddings=MAX_POSITIONS,
        **_LLAMA_LIKE,
    ),
}

ARCHS: tuple[str, ...] = tuple(_CONFIGS)

# Gemma 2 soft-caps attention logits, which only the eager kernel implements; Gemma 3 is kept on eager too.
_EAGER = frozenset({"gemma2", "gemma3"})


def tiny_config(arch: str, n_layers: int = 3) -> PretrainedConfig:
    """The tiny config of ``arch`` (one of ``ARCHS``)."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    return _CONFIGS[arch](n_layers)


def tiny_model(arch: str, n_layers: int = 3, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised fp32 model of ``arch`` in eval mode; the same seed gives the same weights.

    The global torch RNG is left as it was.
    """
    config = tiny_config(arch, n_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="eager" if arch in _EAGER else "sdpa"
        )
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.do_sample = False
    return model.eval()


USER, ASSISTANT, UNK = 2, 3, 4
BOS = BOS_ID
CHAT_TEMPLATE = (
    "<s>{% for m in messages %} <user> {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)


def word_tokenizer(extra: dict[str, int] | None = None) -> PreTrainedTokenizerFast:
    """A real 128-token WordLevel tokenizer: word ``w{i}`` is id i (5..126), with a one-turn chat template.

    ``extra`` renames ids: ``{"A": 123}`` makes id 123 the token ``A`` instead of ``w123``.
    """
    extra = extra or {}
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "<user>": USER, "<assistant>": ASSISTANT, "<unk>": UNK, "</s>": EOS_ID}
    vocab |= {f"w{i}": i for i in range(5, 127) if i not in extra.values()} | extra
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok
