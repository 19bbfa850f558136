"""ReFAT: refusal-feature adversarial fine-tuning with LoRA, so a model refuses even without its refusal feature.

    python -m evals.recipes.refat --out DIR [--minutes 20] [--steps 400]

ReFAT (Yu et al., "Robust LLM safeguarding via refusal feature adversarial training", arXiv 2409.20089) fine-tunes
on refusals of harmful requests and helpful answers to harmless ones; on a random share of the batches the refusal
feature (per layer, the difference of mean residual-stream activations harmful minus harmless at the last prompt
token, as in Arditi et al., arXiv 2406.11717) is projected out of every layer's output for the harmful rows, so the
model learns to refuse by other routes and the refusal-feature-ablation attack (:mod:`evals.attack`) loses its grip.
The feature is recomputed from the current model every ``refresh_every`` steps.

The training data (refusal replies for harmful prompts, the base model's own answers for harmless ones, ``train``
halves only) is :mod:`evals.recipes.refat_data`; the feature and its ablation are :mod:`evals.recipes.refat_ablation`.
Low-rank adapters (LoRA, Hu et al., arXiv 2106.09685) through ``peft``; the
output folder is a standard PEFT adapter that :func:`steerlib.load_model` merges into its base.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from evals.recipes.refat_ablation import ablated, refusal_features
from evals.recipes.refat_data import Example, TrainBatch, build_examples, encode, forward_padded, training_prompts
from steerlib.devices import add_device_arguments

log = logging.getLogger(__name__)


Retain = Literal["ce", "kl", "kl_answer"]


class RefatConfig(BaseModel):
    """Settings of one ReFAT run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_rank: int = Field(8, ge=1, description="rank of the LoRA adapters")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / rank)")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="names of the linear layers that get adapters (attention and MLP projections)",
    )
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate")
    steps: int = Field(400, ge=1, description="maximum number of optimiser steps")
    time_budget_s: float = Field(1500.0, gt=0, description="stop training after this many seconds")
    batch_harmful: int = Field(4, ge=1, description="harmful (prompt, refusal) pairs per batch")
    batch_harmless: int = Field(4, ge=0, description="harmless (prompt, base answer) pairs per batch")
    p_ablate: float = Field(0.5, ge=0, le=1, description="probability that a batch's harmful rows are ablated")
    refresh_every: int = Field(10, ge=1, description="recompute the refusal feature every this many steps")
    direction_prompts: int = Field(16, ge=1, description="harmful and harmless prompts each per recomputation")
    max_prompt_tokens: int = Field(96, ge=8, description="longer rendered prompts are skipped")
    target_tokens: int = Field(32, ge=1, description="greedy tokens of the base model's answer to harmless prompts")
    extra_harmless: int = Field(80, ge=0, description="MMLU questions (train split) added to the harmless prompts")
    retain: Retain = Field(
        "ce",
        description="loss on harmless rows: cross-entropy on the base model's greedy answer (ce), or KL divergence "
        "from the base model's next-token distributions over the whole prompt and answer (kl) or only at the "
        "positions that predict the answer, where refusing or complying is decided (kl_answer); kl and kl_answer "
        "need peft adapters",
    )
    seed: int = Field(0, description="seed of batch sampling, ablation draws and LoRA init")


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    harmful_losses: list[float] = field(default_factory=list)
    ablated: list[bool] = field(default_factory=list)
    refreshed_at: list[int] = field(default_factory=list)
    seconds: float = 0.0


def batch_loss(
    model: nn.Module, batch: TrainBatch, base_logits: Tensor | None = None, *, answer_only: bool = False
) -> tuple[Tensor, Tensor]:
    """The training loss and the harmful rows' mean target cross-entropy (for logging).

    Without ``base_logits``: mean cross-entropy over every row's target tokens. With them (the base model's logits
    on the batch's harmless rows, :func:`base_logits_of`; ``retain="kl"``): the harmful rows' mean target
    cross-entropy plus the harmless rows' mean KL(base || model) over all their real tokens, so harmless behaviour is
    held to the base distribution rather than fitted to one greedy answer. ``answer_only`` (``retain="kl_answer"``):
    the KL only at the positions that predict the answer (from the last prompt token on), so the decision to answer
    is not diluted among the prompt's tokens.
    """
    logits = forward_padded(model, batch.ids_BT, batch.mask_BT).logits[:, :-1].float()
    labels = batch.labels_BT[:, 1:]
    ce_BT = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    scored = labels != -100
    harm = scored & batch.harmful_B[:, None]
    harm_loss = ce_BT[harm].mean() if harm.any() else torch.zeros((), device=logits.device)
    if base_logits is None:
        return ce_BT.sum() / scored.sum(), harm_loss.detach()
    harmless = ~batch.harmful_B
    keep = scored[harmless] if answer_only else batch.mask_BT[harmless, 1:].bool()
    base = base_logits[:, :-1].float().log_softmax(-1)
    kl_BT = (base.exp() * (base - logits[harmless].log_softmax(-1))).sum(-1)
    kl = kl_BT[keep].mean() if keep.any() else torch.zeros((), device=logits.device)
    return harm_loss + kl, harm_loss.detach()


def base_logits_of(model: nn.Module, batch: TrainBatch) -> Tensor:
    """The base model's logits on ``batch``'s harmless rows (the only ones the KL term reads): the same peft model
    with its adapters switched off, no gradient."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ValueError(
            "retain='kl' / 'kl_answer' needs a peft model (its base is the model with the adapters disabled)"
        )
    harmless = ~batch.harmful_B
    with torch.no_grad(), disable():
        return forward_padded(model, batch.ids_BT[harmless], batch.mask_BT[harmless]).logits.float()


def train(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[Example],
    harmless: Sequence[Example],
    cfg: RefatConfig,
    *,
    progress: bool = False,
) -> TrainLog:
    """ReFAT on a model whose trainable parameters are the adapters (any ``nn.Module`` with some trainable)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: wrap it with LoRA adapters first")
    if len(harmful) < cfg.batch_harmful or len(harmless) < cfg.batch_harmless:
        raise ValueError(f"need at least {cfg.batch_harmful} harmful and {cfg.batch_harmless} harmless examples")
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    log_ = TrainLog()
    features: Tensor | None = None
    start = time.monotonic()
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, desc="refat", unit="step", disable=not progress)
    model.train()
    for step in range(cfg.steps):
        if step % cfg.refresh_every == 0:
            n = cfg.direction_prompts
            features = refusal_features(
                model,
                tokenizer,
                [e.prompt for e in rng.sample(list(harmful), min(n, len(harmful)))],
                [e.prompt for e in rng.sample(list(harmless), min(n, len(harmless)))],
            )
            log_.refreshed_at.append(step)
        assert features is not None
        examples = rng.sample(list(harmful), cfg.batch_harmful) + rng.sample(list(harmless), cfg.batch_harmless)
        batch = encode(tokenizer, examples, device)
        ablate = rng.random() < cfg.p_ablate
        rows = batch.harmful_B if ablate else torch.zeros_like(batch.harmful_B)
        base = base_logits_of(model, batch) if cfg.retain != "ce" else None
        with ablated(model, features, rows):
            loss, harm_loss = batch_loss(model, batch, base, answer_only=cfg.retain == "kl_answer")
        opt.zero_grad()
        loss.backward()
        opt.step()
        log_.losses.append(float(loss.detach()))
        log_.harmful_losses.append(float(harm_loss))
        log_.ablated.append(ablate)
        bar.update(1)
        bar.set_postfix(loss=f"{log_.losses[-1]:.3f}", ablated=ablate)
        if time.monotonic() - start > cfg.time_budget_s:
            log.info("time budget of %.0f s reached after %d steps", cfg.time_budget_s, step + 1)
            break
    bar.close()
    model.eval()
    log_.seconds = time.monotonic() - start
    return log_


def with_lora(model: nn.Module, cfg: RefatConfig) -> nn.Module:
    """The model wrapped with fresh LoRA adapters (peft), only they trainable."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise ValueError(f"target_modules {missing} not found in the model; it has e.g. {sorted(present)[:20]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(cfg.target_modules),
            task_type="CAUSAL_LM",
        )
        wrapped: nn.Module = get_peft_model(model, lora)
    return wrapped


def run(
    out: Path, cfg: RefatConfig, model_name: str | None = None, *, device: str = "auto", dtype: str = "auto"
) -> dict[str, Any]:
    """Build the data, train, save the adapter and ``train_log.json`` under ``out`` (the model on ``device``, in
    ``dtype``: settings as in :mod:`steerlib.devices`)."""
    from steerlib import load_model

    model, tok = load_model(model_name, device=device, dtype=dtype)
    params = next(model.parameters())
    harmful_prompts, harmless_prompts = training_prompts(cfg.extra_harmless)
    harmful, harmless = build_examples(
        model,
        tok,
        harmful_prompts,
        harmless_prompts,
        max_prompt_tokens=cfg.max_prompt_tokens,
        target_tokens=cfg.target_tokens,
    )
    log.info("training on %d harmful and %d harmless examples", len(harmful), len(harmless))
    peft_model = with_lora(model, cfg)
    tlog = train(peft_model, tok, harmful, harmless, cfg, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))  # type: ignore[operator]
    summary = {
        "config": cfg.model_dump(mode="json"),
        "n_harmful_examples": len(harmful),
        "n_harmless_examples": len(harmless),
        "steps": len(tlog.losses),
        "threads": torch.get_num_threads(),
        "device": str(params.device),
        "dtype": str(params.dtype).removeprefix("torch."),
        **asdict(tlog),
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True, help="folder for the PEFT adapter and train_log.json")
    ap.add_argument("--model", default=None, help="HF hub id or local folder (default: the embedded model)")
    add_device_arguments(ap)
    ap.add_argument("--minutes", type=float, default=18.0, help="training time budget")
    ap.add_argument("--steps", type=int, default=400, help="maximum optimiser steps")
    ap.add_argument("--batch-harmless", type=int, default=4, help="harmless retention pairs per batch")
    ap.add_argument("--extra-harmless", type=int, default=80, help="MMLU questions added to the harmless prompts")
    ap.add_argument(
        "--retain",
        choices=get_args(Retain),
        default="ce",
        help="harmless rows: CE on base answers, or KL from the base over prompt and answer (kl) or the answer only",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    cfg = RefatConfig(
        steps=args.steps,
        time_budget_s=args.minutes * 60,
        batch_harmless=args.batch_harmless,
        extra_harmless=args.extra_harmless,
        retain=args.retain,
        seed=args.seed,
    )
    summary = run(args.out, cfg, args.model, device=args.device, dtype=args.dtype)
    log.info("trained %d steps in %.0f s; last losses %s", summary["steps"], summary["seconds"], summary["losses"][-5:])


if __name__ == "__main__":
    main()
