"""Generate the embedded model's replies to the chat sources' prompts once, with vLLM, into the reply cache.

    /opt/vllm-venv/bin/python -m sae_train.replies [prompts mmlu ...] [--chunk 64] [--max-tokens 160]

Greedy decoding at fp32 (bf16 changed greedy answers on this CPU, ``shared/DATA.md``). Replies are appended to
:func:`sae_train.chat.replies_path`'s JSONL file a chunk at a time, so a killed run resumes from the last chunk
written. The prompts the SAE holds out (:func:`sae_train.data.is_heldout` of the prompt) go first, so a held-out
measurement can start before the training replies are done.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from sae_train.chat import (
    CHAT_SETS,
    EMBEDDED_MODEL_ID,
    ChatItem,
    Sampling,
    chat_items,
    read_replies,
    render,
    replies_path,
    split_key,
)
from sae_train.data import is_heldout

logger = logging.getLogger(__name__)


def heldout_first(items: list[ChatItem], tokenizer: object, fraction: float = 0.05) -> list[ChatItem]:
    """``items`` with the SAE's held-out prompts first (each group in its original order)."""
    held = [is_heldout(split_key(render(tokenizer, i.prompt, None)), fraction) for i in items]
    return [i for i, h in zip(items, held, strict=True) if h] + [i for i, h in zip(items, held, strict=True) if not h]


def generate(name: str, sampling: Sampling, chunk: int) -> Path:
    import vllm  # the vLLM venv only
    from transformers import AutoTokenizer

    from steerlib.hf.loading import embedded_model_folder

    folder = embedded_model_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    items = chat_items(name, tok)
    path = replies_path(items, EMBEDDED_MODEL_ID, sampling, None)
    done = read_replies(path)
    todo = [i for i in heldout_first(items, tok) if i.id not in done]
    logger.info("chat:%s: %d prompts, %d replies cached in %s, %d to generate", name, len(items), len(done), path,
                len(todo))  # fmt: skip
    if not todo:
        return path
    llm = vllm.LLM(str(folder), dtype="float32", max_model_len=512, seed=0, enable_prefix_caching=True)
    params = vllm.SamplingParams(temperature=sampling.temperature, max_tokens=sampling.max_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(items), initial=len(done), desc=f"replies chat:{name}", unit="prompt")
    t0, n_tok = time.perf_counter(), 0
    try:
        for s in range(0, len(todo), chunk):
            part = todo[s : s + chunk]
            outs = llm.generate([render(tok, i.prompt, None) for i in part], params, use_tqdm=False)
            lines = []
            for item, out in zip(part, outs, strict=True):
                lines.append(json.dumps({"id": item.id, "reply": out.outputs[0].text}) + "\n")
                n_tok += len(out.outputs[0].token_ids)
            with path.open("a", encoding="utf-8") as f:
                f.write("".join(lines))
            bar.update(len(part))
            bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
    finally:
        bar.close()
        llm.llm_engine.engine_core.shutdown()
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    replied = [n for n, s in CHAT_SETS.items() if s.with_replies]
    p.add_argument("sets", nargs="*", default=replied, help=f"chat sources to answer (default: {' '.join(replied)})")
    p.add_argument("--chunk", type=int, default=64, help="prompts per vLLM call (and per append to the cache)")
    p.add_argument("--max-tokens", type=int, default=Sampling.max_tokens, help="reply length cap")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in args.sets:
        print(generate(name, Sampling(max_tokens=args.max_tokens), args.chunk))


if __name__ == "__main__":
    main()
