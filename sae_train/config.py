"""The training config a user writes (YAML or JSON): pydantic models with ``extra="forbid"``, a description per field.

``python -m sae_train CONFIG.yaml`` reads a :class:`TrainConfig`; the resolved parts (``SaeConfig.resolved``,
``OptimConfig.resolved``: copies with every null default filled in) go to the models and the trainer unchanged, as
sparsify passes its config to its trainer; a config is never edited after loading.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from steerlib.devices import DEVICE_HELP, DTYPE_HELP, DtypeName, check_device_name, dtype_name

K_SPARSE = ("topk", "batchtopk", "matryoshka")
"""Architectures with a fixed number ``k`` of active latents per token (on average, for the batch ones)."""
DEFAULT_SOURCES = ["corpus:sotu", "corpus:moby-dick", "corpus:shakespeare", "corpus:python-docs"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    sources: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SOURCES),
        description="Text sources: corpus:<name> (registry-packaged), a local .txt/.jsonl file or folder, or "
        "hf:<dataset>[:<split>]. Documents are taken from each in turn.",
    )
    weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None,
        description="Share of the training text per source (characters; one weight per source, in order; need not "
        "sum to 1): documents come from the source furthest below its share. null: one document from each source "
        "in turn (short documents then weigh little).",
    )
    ctx_len: int = Field(128, ge=2, description="Tokens per packed context, BOS included.")
    bos: bool = Field(True, description="Start every context with the tokenizer's BOS token.")
    heldout_fraction: float = Field(0.05, gt=0, lt=1, description="Fraction of documents held out for evaluation.")
    eval_domains: dict[str, list[str]] | None = Field(
        None,
        description="Held-out evaluation per domain: domain name -> its sources (any source names, trained on or "
        "not; their held-out documents are used), each reported separately in eval.json. null: one set, the "
        "held-out documents of `sources`.",
    )

    @model_validator(mode="after")
    def _one_weight_per_source(self) -> DataConfig:
        if self.weights is not None and (len(self.weights) != len(self.sources) or not any(self.weights)):
            raise ValueError(
                f"data.weights has {len(self.weights)} entries for {len(self.sources)} sources: give one weight per "
                "source, not all zero"
            )
        return self


class ActivationConfig(_Strict):
    n_tokens: int = Field(200_000, gt=0, description="Training tokens to harvest (BOS excluded).")
    harvest_batch: int = Field(16, gt=0, description="Contexts per model forward pass while harvesting.")
    cache_dir: str | None = Field(
        None,
        description="Folder for the memory-mapped activation cache (reused when model, data and sites match); "
        "null: $STEERLIB_CACHE/activations/<fingerprint of model, data, sites and these settings>.",
    )
    dtype: Literal["float32", "float16"] = Field("float32", description="Storage dtype of the cache.")
    cache: bool = Field(
        True,
        description="Harvest once into the on-disk activation cache and train from it (true), or stream: harvest "
        "while training, through a shuffle buffer, writing nothing to disk (false; the model runs again for every "
        "epoch and on resume).",
    )
    shuffle_buffer: int = Field(
        65536, gt=0, description="Rows in the shuffle buffer when streaming (cache: false); at least 2x the batch."
    )
    skip_bos: bool = Field(True, description="Leave each context's first token (BOS) out of training.")
    max_norm_factor: float | None = Field(
        10.0,
        gt=1,
        description="Train only on tokens whose input norm is at most this times the median norm: the rare "
        "'massive activation' tokens (Sun et al., arXiv 2402.17762; norms 100x the median in SmolLM2's middle "
        "layers) otherwise dominate the loss. null keeps every token. Applied when training; the cache keeps all.",
    )


class SaeConfig(_Strict):
    architecture: Literal["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"] = Field(
        "topk", description="Training architecture."
    )
    input_site: str = Field("blocks.15.hook_resid_post", description="Site read (TransformerLens name).")
    output_site: str | None = Field(
        None,
        description="Site predicted; null = input_site (an SAE). blocks.L.hook_mlp_in -> blocks.L.hook_mlp_out "
        "is a transcoder.",
    )
    d_sae: int | None = Field(None, gt=0, description="Number of latents; null = expansion * d_in.")
    expansion: int = Field(8, gt=0, description="Latents per input dimension when d_sae is null.")
    k: int | None = Field(32, gt=0, description="Active latents per token (topk, batchtopk, matryoshka).")
    skip: bool = Field(False, description="Skip transcoder: add a learned linear path x @ W_skip.")
    matryoshka_prefixes: list[int] | None = Field(
        None, description="Nested dictionary sizes ending at d_sae; null = d_sae/8, /4, /2, 1."
    )
    encoder_init_norm: float | None = Field(
        None,
        gt=0,
        description="Norm of each latent's initial encoder column (the encoder starts as the decoder's transpose "
        "times this); null = the architecture's default: 1/sqrt(3) for topk, 1 for the others.",
    )
    jumprelu_bandwidth: float = Field(0.001, gt=0, description="Width of the straight-through kernel (JumpReLU).")
    jumprelu_init_threshold: float = Field(0.001, gt=0, description="Initial threshold (JumpReLU).")

    @model_validator(mode="after")
    def _k_needed(self) -> SaeConfig:
        if self.architecture in K_SPARSE and self.k is None:
            raise ValueError(f"sae.k is required for architecture {self.architecture}")
        return self

    @property
    def out_site(self) -> str:
        """The site predicted: ``output_site``, or ``input_site`` for an SAE."""
        return self.output_site or self.input_site

    @property
    def transcoder(self) -> bool:
        return self.out_site != self.input_site

    def resolved(self, d_in: int) -> SaeConfig:
        """A copy with every null default filled in for inputs of width ``d_in``: ``d_sae``, ``output_site`` and
        ``matryoshka_prefixes`` (the copy resolves to itself)."""
        d_sae = self.d_sae or self.expansion * d_in
        prefixes = self.matryoshka_prefixes or [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
        return self.model_copy(update={"d_sae": d_sae, "output_site": self.out_site, "matryoshka_prefixes": prefixes})


class OptimConfig(_Strict):
    lr: float | None = Field(None, gt=0, description="Adam learning rate; null = 2e-4 / sqrt(d_sae / 16384) (Gao).")
    batch_size: int = Field(4096, gt=0, description="Tokens per global batch (split over processes).")
    steps: int | None = Field(None, gt=0, description="Optimizer steps; null = one pass over the harvested tokens.")
    warmup_steps: int = Field(50, ge=0, description="Linear learning-rate warmup.")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="Final fraction of steps with linear decay to 0.")
    sparsity_coefficient: float = Field(
        1.0, ge=0, description="λ of the L1 (relu, gated) or L0 (jumprelu) penalty; unused by k-sparse architectures."
    )
    sparsity_warmup_steps: int = Field(0, ge=0, description="Steps over which λ ramps linearly from 0.")
    auxk_alpha: float = Field(1 / 32, ge=0, description="Weight of the AuxK loss (topk, batchtopk, matryoshka).")
    dead_tokens: int = Field(1_000_000, gt=0, description="A latent not fired for this many tokens is dead.")
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field(
        "geometric_median", description="Initial decoder bias."
    )
    init_sample: int = Field(4096, gt=0, description="Tokens used for the scale and the b_dec init.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32",
        description="Training compute dtype; bfloat16 = mixed precision by torch.autocast on the run's device "
        "(weights and Adam state stay fp32); auto = bfloat16 where the device runs it natively, else float32.",
    )
    seed: int = Field(0, description="Seed for initialisation and batch order.")

    def resolved(self, d_sae: int, n_rows: int) -> OptimConfig:
        """A copy with ``steps`` and ``lr`` filled in for ``d_sae`` latents and ``n_rows`` training rows per epoch."""
        steps = self.steps or max(1, n_rows // self.batch_size)
        return self.model_copy(update={"steps": steps, "lr": self.lr or 2e-4 / math.sqrt(d_sae / 16384)})


class RunConfig(_Strict):
    out_dir: str = Field("runs/sae", description="Output folder (relative to the config file).")
    checkpoint_every: int = Field(200, gt=0, description="Steps between atomic checkpoints.")
    log_every: int = Field(20, gt=0, description="Steps between lines of metrics.jsonl.")
    resume: bool = Field(True, description="Continue from out_dir/checkpoint.pt if present.")
    eval_contexts: int = Field(64, ge=0, description="Held-out contexts for the final metrics (0 = skip).")
    export_saelens: bool = Field(True, description="Also write the SAE in SAELens' layout (out_dir/saelens).")
    threads: int | None = Field(None, gt=0, description="torch threads; null = torch's default.")


class TrainConfig(_Strict):
    model: str | None = Field(
        None,
        description="Model: null = the embedded SmolLM2-135M-Instruct, else a "
        "local folder or hub id (steerlib.load_model).",
    )
    device: Annotated[str, AfterValidator(check_device_name)] = Field(
        "auto",
        description=f"Where the model harvests and the SAE trains: {DEVICE_HELP}. With torchrun on CUDA each "
        "process takes cuda:LOCAL_RANK.",
    )
    dtype: Annotated[DtypeName, BeforeValidator(dtype_name)] = Field(
        "auto", description=f"The model's dtype while harvesting and evaluating: {DTYPE_HELP}."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    activations: ActivationConfig = Field(default_factory=ActivationConfig)
    sae: SaeConfig = Field(default_factory=SaeConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _buffer_holds_two_batches(self) -> TrainConfig:
        if not self.activations.cache and self.activations.shuffle_buffer < 2 * self.optim.batch_size:
            raise ValueError(
                f"activations.shuffle_buffer={self.activations.shuffle_buffer} must be at least 2x "
                f"optim.batch_size={self.optim.batch_size} when streaming (activations.cache: false)"
            )
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a training config must be a mapping, got {type(raw).__name__}")
        return cls.model_validate(raw)
