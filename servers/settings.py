"""Server settings: command-line flags beat ``STEERLIB_SERVER_*`` environment variables, which beat a YAML file.

Unknown keys are errors at every level (a typo in ``server.yaml`` stops the server rather than being ignored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from steerlib.config import MAX_LAYERS_PER_INTERVENTION, MAX_MAGNITUDE
from steerlib.devices import DEVICE_HELP, DTYPE_HELP, DtypeName, check_device_name, dtype_name


def _dtype_setting(value: object) -> str:
    """:func:`dtype_name` of a YAML or env value; a non-string (``dtype: [bf16]``) is the same clear error."""
    if not isinstance(value, str):
        raise ValueError(f"dtype {value!r} is not one of: {DTYPE_HELP}")
    return dtype_name(value)


class ServerSettings(BaseSettings):
    """Everything the server can be told; every field can be a flag, an env variable or a YAML key."""

    model_config = SettingsConfigDict(env_prefix="STEERLIB_SERVER_", extra="forbid", frozen=True)

    model: str | None = Field(None, description="Model folder, hub id or PEFT adapter; None = embedded SmolLM2.")
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="What runs the model: `hf` (transformers, steerlib's batching engine) or `vllm` (vLLM's async "
        "engine with continuous batching, steered by steerlib's vLLM plugin; needs vLLM installed). Both serve the "
        "same API; feature inspection and the audit record need `hf`.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="With `--engine vllm`: GPUs the model is split over.")
    vllm_args: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="With `--engine vllm`: more of vLLM's engine arguments as a JSON object, for example "
        '\'{"max_model_len": 4096, "gpu_memory_utilization": 0.8, "enforce_eager": true}\'.',
    )
    device: Annotated[str, AfterValidator(check_device_name)] = Field(
        "auto", description=f"Where the model runs: {DEVICE_HELP}."
    )
    dtype: Annotated[DtypeName, BeforeValidator(_dtype_setting)] = Field(
        "auto", description=f"The model's dtype: {DTYPE_HELP}."
    )
    model_name: str | None = Field(
        None, description="The id clients pass as `model` (default: the model folder's name, or the embedded name)."
    )
    presets: Path | None = Field(
        None, description="Folder of steering presets (YAML configs, vectors/, probes/, saes/)."
    )
    default_presets: list[str] = Field(
        default_factory=list, description="Presets applied when a request has no `steering` field."
    )
    features: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Feature index folders (from `python -m evals.autointerp index`) shown at /browser; each index's "
        "SAE can be named in steering by the index's folder name. Several: list them after the flag, or separate them "
        "with ':' in the environment variable.",
    )
    allow_preset_writes: bool = Field(
        False, description="Let clients save presets into the presets folder (POST /v1/steering/presets)."
    )
    allow_preset_overwrite: bool = Field(
        False,
        description="Let clients who may save presets also replace existing ones (never the default presets).",
    )
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    api_key: str | None = Field(None, description="If set, requests need `Authorization: Bearer <api_key>`.")
    key_policy: Path | None = Field(
        None,
        description="YAML file mapping API keys to what each may do (presets, inline configs, ops, caps, preset "
        "writes); see servers/keys.py. Requests then need one of its keys (or `api_key`, which may do everything).",
    )
    audit_log: Path | None = Field(
        None,
        description="Append one JSON line per generation request: presets and ops applied, gate scores and "
        "decisions, the detector that answered, tokens each op touched, the key's name.",
    )
    audit_text: bool = Field(False, description="Also write the prompt and the response text to the audit log.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names browsers may address this server by (DNS-rebinding guard). Empty: the loopback "
        "names when `host` is a loopback address, any host otherwise. Given, every request's Host is checked. "
        "Env: comma-separated.",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins (scheme://host:port) other than the server's own whose pages may call the API "
        "from a browser. Env: comma-separated.",
    )
    max_batch: int = Field(16, ge=1, le=256, description="Most requests decoded together in one batch.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long the worker waits for more requests to batch.")
    max_queue: int = Field(64, ge=1, description="Requests waiting beyond this many are refused with 429.")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest prompt accepted, in tokens.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest `max_tokens` a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="`max_tokens` when a request gives none.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still unfinished after this fails (408).")
    shutdown_grace_s: float = Field(10.0, ge=0, description="On shutdown, in-flight requests get this long.")
    max_coefficient: float = Field(
        1e4, gt=0, le=MAX_MAGNITUDE, description="Largest |coefficient| of an inline intervention."
    )
    max_edit_value: float = Field(1e4, gt=0, le=MAX_MAGNITUDE, description="Largest |value| of an inline SAE edit.")
    max_layers_per_intervention: int = Field(
        128, ge=1, le=MAX_LAYERS_PER_INTERVENTION, description="Most layers one inline intervention may name."
    )
    max_selector_items: int = Field(
        256, ge=1, description="Most entries of an inline `apply.positions` or `apply.match` list."
    )
    max_stop_chars: int = Field(128, ge=1, description="Longest stop sequence, in characters.")
    max_top_logprobs: int = Field(
        20, ge=0, description="Most alternatives per token a request may ask for (`top_logprobs`, `logprobs: N`)."
    )
    max_activation_floats: int = Field(
        2**20, ge=0, description="Most floats of raw activations one request may ask for (`return_activations`)."
    )
    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest request body, in bytes (refused with 413 before it is parsed)."
    )
    max_batch_cost: int = Field(
        4096,
        ge=1,
        description="Most (op, layer) steps one batch may hold (a position listed in a selector counts one more); "
        "a request beyond it alone is refused, others wait for the next batch.",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads; None leaves torch's default.")
    log_level: str = Field("info", description="Python logging level name.")

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @model_validator(mode="after")
    def _engine_fits(self) -> ServerSettings:
        """Settings that only one engine reads are errors with the other (never silently ignored)."""
        if self.engine == "vllm":
            if self.device != "auto":
                raise ValueError(
                    f"device: {self.device!r} with engine vllm; vLLM places the model itself (choose GPUs with "
                    "CUDA_VISIBLE_DEVICES and tensor_parallel_size): leave device at 'auto'"
                )
            if self.audit_log is not None:
                raise ValueError("audit_log needs engine hf (its records read the activations in this process)")
        elif self.tensor_parallel_size != 1 or self.vllm_args:
            field = "tensor_parallel_size" if self.tensor_parallel_size != 1 else "vllm_args"
            raise ValueError(f"{field} is a setting of engine vllm; this server's engine is {self.engine!r}")
        return self

    @field_validator("vllm_args", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        """A flag or environment value is JSON text."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"vllm_args must be a JSON object: {e}") from None
        return value

    @field_validator("api_key")
    @classmethod
    def _non_empty_key(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("api_key is empty: give a key, or leave it unset to serve without one")
        return value

    @field_validator("features", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        """An environment value is one string: ``DIR`` or ``DIR1:DIR2`` (``os.pathsep``)."""
        if isinstance(value, str | Path):
            return [p for p in str(value).split(os.pathsep) if p]
        return value


def load_settings(flags: dict[str, Any], config_file: Path | None = None) -> ServerSettings:
    """Settings from ``flags`` (highest priority), the environment, then ``config_file`` (YAML)."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"server config file not found: {config_file}")

    class _WithFile(ServerSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if config_file is not None:
                sources += (YamlConfigSettingsSource(settings_cls, yaml_file=config_file),)
            return sources

    merged = _WithFile(**{k: v for k, v in flags.items() if v is not None})
    return ServerSettings.model_validate(merged.model_dump())
