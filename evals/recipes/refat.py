"""ReFAT: refusal-feature adversarial fine-tuning with LoRA, so a model refuses even without its refusal feature.

    python -m evals.recipes.refat --out DIR [--minutes 20] [--steps 400]

ReFAT (Yu et al., "Robust LLM safeguarding via refusal feature adversarial training", arXiv 2409.20089) fine-tunes
on refusals of harmful requests and helpful answers to harmless ones; on a random share of the batches the refusal
feature (per layer, the difference of mean residual-stream activations harmful minus harmless at the last prompt
token, as in Arditi et al., arXiv 2406.11717) is projected out of every layer's output for the harmful rows, so the
model learns to refuse by other routes and the refusal-feature-ablation attack (:mod:`evals.attack`) loses its grip.
The feature is recomputed from the current model every ``refresh_every`` steps.

The embedded SmolLM2-135M-Instruct almost never refuses, so the harmful targets are short refusal replies (a few
templates, chosen per prompt by hash) and the harmless targets are the base model's own greedy answers
(self-distillation, which keeps behaviour on harmless prompts). Only the ``train`` halves of the benchmark splits
(:func:`evals.datasets.split`) are used. Low-rank adapters (LoRA, Hu et al., arXiv 2106.09685) through ``peft``; the
output folder is a standard PEFT adapter that :func:`steerlib.load_model` merges into its base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from steerlib.devices import add_device_arguments
from steerlib.extract.activations import left_pad, pad_id_of
from steerlib.hf.generate import generate, render_prompts
from steerlib.hf.layout import get_layout

log = logging.getLogger(__name__)

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that. It could cause real harm.",
    "Sorry, I can't provide that. Is there something else I can help you with?",
    "I cannot help with this request, as it could be used to hurt people.",
)
"""Refusal replies for harmful training prompts; each starts with a phrase the substring judge recognises."""

HARMFUL_SETS = ("harmbench", "advbench", "donotanswer", "harmful_probes")
HARMLESS_SETS = ("harmless_probes", "rho_benign", "rho_overrefusal")


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


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str
    harmful: bool


@dataclass(frozen=True)
class TrainBatch:
    ids_BT: Tensor
    mask_BT: Tensor
    labels_BT: Tensor
    """Target token ids where the loss is taken, -100 elsewhere."""
    harmful_B: Tensor


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    harmful_losses: list[float] = field(default_factory=list)
    ablated: list[bool] = field(default_factory=list)
    refreshed_at: list[int] = field(default_factory=list)
    seconds: float = 0.0


def refusal_for(prompt: str) -> str:
    """A refusal template chosen by a hash of the prompt (the same prompt always gets the same reply)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big")
    return REFUSALS[h % len(REFUSALS)]


def _prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in render_prompts(tokenizer, prompts)]


def encode(tokenizer: Any, examples: Sequence[Example], device: torch.device) -> TrainBatch:
    """Chat-rendered prompt + target + end of turn, left padded; the loss covers the target and end of turn."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end the target turn with")
    prompts = _prompt_ids(tokenizer, [e.prompt for e in examples])
    seqs, n_prompt = [], []
    for p, e in zip(prompts, examples, strict=True):
        t = [*tokenizer(e.target, add_special_tokens=False)["input_ids"], int(tokenizer.eos_token_id)]
        seqs.append(p + t)
        n_prompt.append(len(p))
    ids, mask = left_pad(seqs, pad_id_of(tokenizer), device)
    labels = torch.full_like(ids, -100)
    width = ids.shape[1]
    for b, (s, n) in enumerate(zip(seqs, n_prompt, strict=True)):
        labels[b, width - len(s) + n :] = ids[b, width - len(s) + n :]
    harmful = torch.tensor([e.harmful for e in examples], device=device)
    return TrainBatch(ids, mask, labels, harmful)


def _forward(model: nn.Module, ids_BT: Tensor, mask_BT: Tensor, **kw: Any) -> Any:
    position_ids = (mask_BT.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=position_ids, use_cache=False, **kw)


def refusal_features(
    model: nn.Module, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16
) -> Tensor:
    """``(L, D)``: per decoder layer, mean(harmful) - mean(harmless) of its output at the last prompt token."""
    device = next(model.parameters()).device

    def means(prompts: Sequence[str]) -> Tensor:
        seqs = _prompt_ids(tokenizer, prompts)
        total: Tensor | None = None
        for start in range(0, len(seqs), batch_size):
            ids, mask = left_pad(seqs[start : start + batch_size], pad_id_of(tokenizer), device)
            with torch.no_grad():
                hs = _forward(model, ids, mask, output_hidden_states=True).hidden_states
            last_LBD = torch.stack([h[:, -1].float() for h in hs[1:]])
            total = last_LBD.sum(1) if total is None else total + last_LBD.sum(1)
        assert total is not None
        return total / len(seqs)

    if not harmful or not harmless:
        raise ValueError(f"need harmful and harmless prompts, got {len(harmful)} and {len(harmless)}")
    was_training = model.training
    model.eval()
    try:
        return means(harmful) - means(harmless)
    finally:
        model.train(was_training)


@contextmanager
def ablated(model: nn.Module, features_LD: Tensor, rows_B: Tensor) -> Iterator[None]:
    """Project each layer's feature out of that layer's output, for the rows where ``rows_B`` is set."""
    layout = get_layout(model)
    if features_LD.shape[0] != layout.n_layers:
        raise ValueError(f"got {features_LD.shape[0]} feature directions for a model of {layout.n_layers} layers")
    unit_LD = features_LD / features_LD.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    handles = []

    def hook_for(u_D: Tensor) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            u = u_D.to(h.dtype)
            h = h - rows_B.to(h.dtype)[:, None, None] * (h @ u)[..., None] * u
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    try:
        for i in range(layout.n_layers):
            handles.append(layout.layer(i).register_forward_hook(hook_for(unit_LD[i])))
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    logits = _forward(model, batch.ids_BT, batch.mask_BT).logits[:, :-1].float()
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
        return _forward(model, batch.ids_BT[harmless], batch.mask_BT[harmless]).logits.float()


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


# -- data ------------------------------------------------------------------------------------------------------


def training_prompts(cfg: RefatConfig) -> tuple[list[str], list[str]]:
    """Harmful and harmless prompts of the ``train`` halves (plus MMLU questions of the train half as harmless)."""
    from evals.datasets import in_train, load_dataset, load_mmlu, split

    harmful = [p.text for n in HARMFUL_SETS for p in split(load_dataset(n), "train")]
    harmless = [p.text for n in HARMLESS_SETS for p in split(load_dataset(n), "train")]
    if cfg.extra_harmless:
        harmless += [q.question for q in load_mmlu() if in_train(q.question)][: cfg.extra_harmless]
    return harmful, harmless


def build_examples(
    model: nn.Module, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], cfg: RefatConfig
) -> tuple[list[Example], list[Example]]:
    """Refusal targets for harmful prompts, the base model's greedy answers for harmless ones (long prompts dropped)."""

    def short(ps: Sequence[str]) -> list[str]:
        return [p for p, ids in zip(ps, _prompt_ids(tokenizer, ps), strict=True) if len(ids) <= cfg.max_prompt_tokens]

    harmful, harmless = short(harmful), short(harmless)
    log.info("generating base answers for %d harmless prompts", len(harmless))
    answers = generate(model, tokenizer, harmless, max_new_tokens=cfg.target_tokens, batch_size=16)
    return (
        [Example(p, refusal_for(p), True) for p in harmful],
        [Example(p, g.text.strip(), False) for p, g in zip(harmless, answers, strict=True) if g.text.strip()],
    )


def run(
    out: Path, cfg: RefatConfig, model_name: str | None = None, *, device: str = "auto", dtype: str = "auto"
) -> dict[str, Any]:
    """Build the data, train, save the adapter and ``train_log.json`` under ``out`` (the model on ``device``, in
    ``dtype``: settings as in :mod:`steerlib.devices`)."""
    from steerlib import load_model

    model, tok = load_model(model_name, device=device, dtype=dtype)
    params = next(model.parameters())
    harmful_prompts, harmless_prompts = training_prompts(cfg)
    harmful, harmless = build_examples(model, tok, harmful_prompts, harmless_prompts, cfg)
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
