"""Each SAE file format, from hand-made files in the format's exact on-disk layout (d_in=8, d_sae=16).

Every loaded SAE is compared with an independent numpy reimplementation of that format's published formula, written
from the source project's code (cited per test), not from steerlib's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steerlib.sae import (
    BatchTopKSae,
    GatedSae,
    JumpReluSae,
    ReluSae,
    Sae,
    SaeMeta,
    TopKSae,
    get_architecture,
    load_sae,
    save_sae,
)

D_IN, D_SAE, K = 8, 16, 4
Arrays = dict[str, np.ndarray]


# -- helpers ---------------------------------------------------------------------------------------
def rand(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0)


def topk_dense(h: np.ndarray, k: int) -> np.ndarray:
    """relu of the k largest entries of each row, zeros elsewhere."""
    idx = np.argsort(-h, axis=-1)[..., :k]
    out = np.zeros_like(h)
    np.put_along_axis(out, idx, relu(np.take_along_axis(h, idx, -1)), -1)
    return out


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_safetensors(path: Path, arrays: Arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.from_numpy(a) for name, a in arrays.items()}, str(path))


def write_npz(path: Path, arrays: Arrays) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds like allow_pickle


def check(sae: Sae, x: np.ndarray, z_ref: np.ndarray, out_ref: np.ndarray) -> None:
    """``encode`` and ``decode`` agree with the reference; ``forward`` is ``decode(encode(x))``."""
    xt = torch.from_numpy(x)
    with torch.no_grad():
        z = sae.encode(xt)
        out = sae.decode(z, xt)
        fwd = sae(xt)
    np.testing.assert_array_equal(z.numpy() > 0, z_ref > 0)
    np.testing.assert_allclose(z.numpy(), z_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.numpy(), out_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fwd.numpy(), out.numpy(), rtol=0, atol=1e-6)
    assert 0 < int((z_ref > 0).sum()) < z_ref.size


# -- Gemma Scope -----------------------------------------------------------------------------------
def gemma_params(rng: np.random.Generator) -> Arrays:
    return {
        "W_enc": rand(rng, D_IN, D_SAE),
        "W_dec": rand(rng, D_SAE, D_IN),
        "b_enc": rand(rng, D_SAE, scale=0.1),
        "b_dec": rand(rng, D_IN, scale=0.1),
        "threshold": np.abs(rand(rng, D_SAE, scale=0.4)),
    }


def test_gemma_scope_is_jumprelu_without_input_centring(tmp_path: Path) -> None:
    # Gemma Scope tutorial JumpReLUSAE: pre = x @ W_enc + b_enc; acts = (pre > threshold) * relu(pre)
    rng = np.random.default_rng(1)
    p = gemma_params(rng)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True)
    write_npz(folder / "params.npz", p)
    x = rand(rng, 6, D_IN, scale=1.0)
    pre = x @ p["W_enc"] + p["b_enc"]
    z = relu(pre) * (pre > p["threshold"])
    assert ((pre > 0) & (pre <= p["threshold"])).any()  # the threshold does cut something
    for path in (folder, folder / "params.npz"):
        sae = load_sae(path)
        assert isinstance(sae, JumpReluSae) and not sae.subtract_b_dec
        assert sae.meta == SaeMeta(
            "jumprelu",
            8,
            16,
            8,
            "blocks.3.hook_resid_post",
            "blocks.3.hook_resid_post",
            "google/gemma-2-2b",
            source_format="gemma_scope",
        )
        check(sae, x, z, z @ p["W_dec"] + p["b_dec"])


def test_gemma_scope_lowercase_names_and_dtype(tmp_path: Path) -> None:
    p = gemma_params(np.random.default_rng(2))
    write_npz(tmp_path / "params.npz", {("w_" + k[2:] if k.startswith("W_") else k): v for k, v in p.items()})
    sae = load_sae(tmp_path, dtype=torch.float64)
    assert sae.W_enc.dtype == torch.float64
    assert torch.equal(sae.W_enc, torch.from_numpy(p["W_enc"]).double())
    assert sae.meta.input_site is None and sae.meta.model is None


# -- SAELens ---------------------------------------------------------------------------------------
def saelens_weights(rng: np.random.Generator, arch: str, d_out: int = D_IN) -> Arrays:
    w = {"W_enc": rand(rng, D_IN, D_SAE), "W_dec": rand(rng, D_SAE, d_out), "b_dec": rand(rng, d_out, scale=0.2)}
    if arch == "gated":
        w |= {"b_gate": rand(rng, D_SAE, scale=0.2), "r_mag": rand(rng, D_SAE, scale=0.3)}
        w["b_mag"] = rand(rng, D_SAE, scale=0.2)
    else:
        w["b_enc"] = rand(rng, D_SAE, scale=0.2)
    if arch == "jumprelu":
        w["threshold"] = np.abs(rand(rng, D_SAE, scale=0.4))
    return w


def saelens_reference(arch: str, w: Arrays, x: np.ndarray, apply_b_dec: bool, k: int = K) -> np.ndarray:
    # sae_lens/saes/{standard,topk,jumprelu,gated}_sae.py: process_sae_in subtracts b_dec * apply_b_dec_to_input
    sae_in = x - w["b_dec"] if apply_b_dec else x
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
        return gate * relu(sae_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"])
    h = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        return topk_dense(h, k)
    if arch == "jumprelu":
        return relu(h) * (h > w["threshold"])
    return relu(h)


def saelens_v6_cfg(arch: str, apply_b_dec: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.1",
            "sae_lens_training_version": "6.5.1",
            "model_name": "gpt2",
            "hook_name": "blocks.8.hook_resid_post",
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": 128,
        },
        **extra,
    }


SAELENS_CLASSES: dict[str, type[Sae]] = {
    "standard": ReluSae,
    "topk": TopKSae,
    "jumprelu": JumpReluSae,
    "gated": GatedSae,
}


@pytest.mark.parametrize(
    ("arch", "apply_b_dec"),
    [("standard", True), ("standard", False), ("topk", True), ("jumprelu", False), ("jumprelu", True), ("gated", True)],
)
def test_saelens_v6(tmp_path: Path, arch: str, apply_b_dec: bool) -> None:
    rng = np.random.default_rng(3)
    w = saelens_weights(rng, arch)
    write_json(tmp_path / "cfg.json", saelens_v6_cfg(arch, apply_b_dec, **({"k": K} if arch == "topk" else {})))
    write_safetensors(tmp_path / "sae_weights.safetensors", w)
    sae = load_sae(tmp_path)
    assert type(sae) is SAELENS_CLASSES[arch]
    assert sae.subtract_b_dec is apply_b_dec
    assert (sae.meta.input_site, sae.meta.output_site, sae.meta.model) == ("blocks.8.hook_resid_post",) * 2 + ("gpt2",)
    assert sae.meta.source_format == "saelens" and not sae.is_transcoder
    x = rand(rng, 6, D_IN, scale=1.0)
    z = saelens_reference(arch, w, x, apply_b_dec)
    check(sae, x, z, z @ w["W_dec"] + w["b_dec"])


def test_saelens_5x_topk_config(tmp_path: Path) -> None:
    # 5.x: architecture "standard" + activation_fn_str "topk" + activation_fn_kwargs.k; run details at top level
    rng = np.random.default_rng(4)
    w = saelens_weights(rng, "standard")
    cfg = {
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
        "context_size": 128, "model_name": "pythia-70m", "hook_name": "blocks.2.hook_resid_post", "hook_layer": 2,
        "hook_head_index": None, "prepend_bos": True, "dataset_path": "x", "dataset_trust_remote_code": True,
        "normalize_activations": False, "dtype": "float32", "device": "cpu", "sae_lens_training_version": "3.2.1",
    }  # fmt: skip
    write_json(tmp_path / "cfg.json", cfg)
    write_safetensors(tmp_path / "sae_weights.safetensors", w)
    sae = load_sae(tmp_path)
    assert isinstance(sae, TopKSae) and sae.k == 3 and sae.meta.k == 3
    assert (sae.meta.input_site, sae.meta.model) == ("blocks.2.hook_resid_post", "pythia-70m")
    x = rand(rng, 6, D_IN, scale=1.0)
    z = saelens_reference("topk", w, x, True, k=3)
    check(sae, x, z, z @ w["W_dec"] + w["b_dec"])


def test_saelens_5x_finetuning_scaling_factor_scales_latents_before_decoding(tmp_path: Path) -> None:
    # sae_lens 5.x decode: apply_finetuning_scaling_factor(z) @ W_dec + b_dec, with z * scaling_factor
    rng = np.random.default_rng(5)
    w = saelens_weights(rng, "standard") | {"scaling_factor": 1 + np.abs(rand(rng, D_SAE))}
    cfg = saelens_v6_cfg("standard") | {"finetuning_scaling_factor": True}
    del cfg["metadata"]
    write_json(tmp_path / "cfg.json", cfg)
    write_safetensors(tmp_path / "sae_weights.safetensors", w)
    x = rand(rng, 6, D_IN, scale=1.0)
    z = saelens_reference("standard", w, x, True)
    check(load_sae(tmp_path), x, z, (z * w["scaling_factor"]) @ w["W_dec"] + w["b_dec"])


def test_saelens_topk_rescale_acts_by_decoder_norm(tmp_path: Path) -> None:
    # sae_lens/saes/topk_sae.py: encode topk(hidden_pre * ||W_dec||), decode (z / ||W_dec||) @ W_dec + b_dec
    rng = np.random.default_rng(6)
    w = saelens_weights(rng, "topk")
    write_json(tmp_path / "cfg.json", saelens_v6_cfg("topk", k=K, rescale_acts_by_decoder_norm=True))
    write_safetensors(tmp_path / "sae_weights.safetensors", w)
    x = rand(rng, 6, D_IN, scale=1.0)
    norm = np.linalg.norm(w["W_dec"], axis=-1)
    z = topk_dense(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norm, K)
    check(load_sae(tmp_path), x, z, (z / norm) @ w["W_dec"] + w["b_dec"])


def test_saelens_skip_transcoder(tmp_path: Path) -> None:
    # sae_lens/saes/transcoder.py: no b_dec subtraction; SkipTranscoder adds x @ W_skip.T, W_skip is (d_out, d_in)
    rng = np.random.default_rng(7)
    w = saelens_weights(rng, "standard", d_out=6) | {"W_skip": rand(rng, 6, D_IN)}
    cfg = saelens_v6_cfg("skip_transcoder", apply_b_dec=False, d_out=6)
    cfg["metadata"] |= {"hook_name": "blocks.2.ln2.hook_normalized", "hook_name_out": "blocks.2.hook_mlp_out"}
    write_json(tmp_path / "cfg.json", cfg)
    write_safetensors(tmp_path / "sae_weights.safetensors", w)
    sae = load_sae(tmp_path)
    assert isinstance(sae, ReluSae) and sae.is_transcoder and not sae.subtract_b_dec
    assert (sae.meta.input_site, sae.meta.output_site) == ("blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out")
    x = rand(rng, 6, D_IN, scale=1.0)
    z = relu(x @ w["W_enc"] + w["b_enc"])
    check(sae, x, z, z @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T)


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm", "expected_average_only_in"])
def test_saelens_unsupported_normalization_is_named(tmp_path: Path, mode: str) -> None:
    write_json(tmp_path / "cfg.json", saelens_v6_cfg("standard", normalize_activations=mode))
    write_safetensors(tmp_path / "sae_weights.safetensors", saelens_weights(np.random.default_rng(0), "standard"))
    with pytest.raises(ValueError, match=f"normalize_activations='{mode}' is not supported; supported: 'none'"):
        load_sae(tmp_path)


def test_saelens_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    write_json(tmp_path / "cfg.json", saelens_v6_cfg("batchtopk"))
    write_safetensors(tmp_path / "sae_weights.safetensors", saelens_weights(np.random.default_rng(0), "standard"))
    with pytest.raises(ValueError, match="architecture 'batchtopk' is not supported; supported: standard, topk"):
        load_sae(tmp_path)


# -- sparsify --------------------------------------------------------------------------------------
def write_sparsify(folder: Path, rng: np.random.Generator, *, transcode: bool, skip: bool) -> Arrays:
    cfg: dict[str, Any] = {
        "activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
        "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": D_IN,
    }  # fmt: skip
    w = {
        "encoder.weight": rand(rng, D_SAE, D_IN),
        "encoder.bias": rand(rng, D_SAE, scale=0.2),
        "W_dec": rand(rng, D_SAE, D_IN),
        "b_dec": rand(rng, D_IN, scale=0.2),
    }
    if skip:
        w["W_skip"] = rand(rng, D_IN, D_IN)
    write_json(folder / "cfg.json", cfg)
    write_safetensors(folder / "sae.safetensors", w)
    return w


def sparsify_reference(w: Arrays, x: np.ndarray, transcode: bool) -> tuple[np.ndarray, np.ndarray]:
    # sparsify/sparse_coder.py: encode subtracts b_dec unless transcode; fused_encoder: topk of relu(linear(x));
    # decode: embedding_bag over W_dec rows + b_dec; forward adds x @ W_skip.mT
    x_in = x if transcode else x - w["b_dec"]
    z = topk_dense(relu(x_in @ w["encoder.weight"].T + w["encoder.bias"]), K)
    out = z @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return z, out


def test_sparsify_sae_subtracts_b_dec(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    w = write_sparsify(tmp_path / "run" / "layers.3", rng, transcode=False, skip=False)
    write_json(tmp_path / "run" / "config.json", {"model": "EleutherAI/pythia-70m", "sae": {"k": K}})
    sae = load_sae(tmp_path / "run" / "layers.3")
    assert isinstance(sae, TopKSae) and sae.subtract_b_dec and sae.k == K
    assert sae.meta == SaeMeta(
        "topk",
        8,
        16,
        8,
        "blocks.3.hook_resid_post",
        "blocks.3.hook_resid_post",
        "EleutherAI/pythia-70m",
        K,
        source_format="sparsify",
    )
    x = rand(rng, 6, D_IN, scale=1.0)
    check(sae, x, *sparsify_reference(w, x, transcode=False))


def test_sparsify_skip_transcoder_keeps_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    w = write_sparsify(tmp_path / "layers.2.mlp", rng, transcode=True, skip=True)
    sae = load_sae(tmp_path / "layers.2.mlp" / "sae.safetensors")
    assert isinstance(sae, TopKSae) and not sae.subtract_b_dec and sae.is_transcoder
    assert (sae.meta.input_site, sae.meta.output_site) == ("blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out")
    x = rand(rng, 6, D_IN, scale=1.0)
    check(sae, x, *sparsify_reference(w, x, transcode=True))


def test_sparsify_config_without_transcode_key_subtracts(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    w = write_sparsify(tmp_path / "layers.0", rng, transcode=False, skip=False)
    cfg = json.loads((tmp_path / "layers.0" / "cfg.json").read_text())
    del cfg["transcode"], cfg["activation"]  # configs from before Feb 2025
    write_json(tmp_path / "layers.0" / "cfg.json", cfg)
    x = rand(rng, 6, D_IN, scale=1.0)
    check(load_sae(tmp_path / "layers.0"), x, *sparsify_reference(w, x, transcode=False))


def test_sparsify_parent_folder_lists_hookpoints(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    for name in ("layers.10", "layers.3", "layers.2.mlp"):
        write_sparsify(tmp_path / name, rng, transcode=False, skip=False)
    write_json(tmp_path / "config.json", {"model": "m"})
    expected = "holds no SAE itself but 3 subfolder(s) do, one per hookpoint: layers.2.mlp, layers.3, layers.10"
    with pytest.raises(ValueError, match=re.escape(f"{expected}; pass one of them, e.g. {tmp_path / 'layers.2.mlp'}")):
        load_sae(tmp_path)


def test_sparsify_groupmax_is_refused(tmp_path: Path) -> None:
    write_sparsify(tmp_path, np.random.default_rng(0), transcode=False, skip=False)
    write_json(tmp_path / "cfg.json", {"activation": "groupmax", "k": K, "d_in": D_IN, "num_latents": D_SAE})
    with pytest.raises(ValueError, match="sparsify activation 'groupmax' is not supported; supported: 'topk'"):
        load_sae(tmp_path)


# -- dictionary_learning ---------------------------------------------------------------------------
def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def write_dl(folder: Path, dict_class: str, sd: dict[str, torch.Tensor], **trainer: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "ae.pt")
    config = {
        "trainer": {
            "dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "lr": 1e-4, "seed": 0,
            "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_3", **trainer,
        },
        "buffer": {"d_submodule": D_IN, "ctx_len": 128},
    }  # fmt: skip
    write_json(folder / "config.json", config)


def linear_sd(rng: np.random.Generator, unit_decoder: bool) -> Arrays:
    dec = rand(rng, D_IN, D_SAE)  # nn.Linear(dict_size, activation_dim).weight: (d_in, d_sae)
    if unit_decoder:
        dec = dec / np.linalg.norm(dec, axis=0, keepdims=True)
    enc = {"encoder.weight": rand(rng, D_SAE, D_IN), "encoder.bias": rand(rng, D_SAE, scale=0.2)}
    return enc | {"decoder.weight": dec}


@pytest.mark.parametrize("unit_decoder", [True, False])
def test_dictionary_learning_autoencoder(tmp_path: Path, unit_decoder: bool) -> None:
    # dictionary.py AutoEncoder: encode relu(encoder(x - bias)); decode decoder(f) + bias; from_pretrained
    # normalises decoder columns and multiplies encoder rows and bias by the old norms
    rng = np.random.default_rng(12)
    w = linear_sd(rng, unit_decoder) | {"bias": rand(rng, D_IN, scale=0.2)}
    write_dl(tmp_path, "AutoEncoder", {k: t(v) for k, v in w.items()}, trainer_class="StandardTrainer")
    sae = load_sae(tmp_path)
    assert isinstance(sae, ReluSae) and sae.subtract_b_dec
    assert (sae.meta.input_site, sae.meta.model) == ("blocks.3.hook_resid_post", "EleutherAI/pythia-70m-deduped")
    x = rand(rng, 6, D_IN, scale=1.0)
    f = relu((x - w["bias"]) @ w["encoder.weight"].T + w["encoder.bias"])
    out = f @ w["decoder.weight"].T + w["bias"]  # the un-normalised model's output: normalising preserves it
    norm = np.linalg.norm(w["decoder.weight"], axis=0)
    check(sae, x, f * norm if not unit_decoder else f, out)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_dictionary_learning_topk_ignores_its_threshold(tmp_path: Path) -> None:
    # trainers/top_k.py AutoEncoderTopK.encode(use_threshold=False): topk of relu(encoder(x - b_dec))
    rng = np.random.default_rng(13)
    w = linear_sd(rng, True) | {"b_dec": rand(rng, D_IN, scale=0.2)}
    sd = {k: t(v) for k, v in w.items()} | {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.7)}
    write_dl(tmp_path, "AutoEncoderTopK", sd, k=K)
    sae = load_sae(tmp_path)
    assert isinstance(sae, TopKSae) and sae.k == K
    x = rand(rng, 6, D_IN, scale=1.0)
    z = topk_dense(relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]), K)
    assert ((z > 0) & (z <= 0.7)).any()
    check(sae, x, z, z @ w["decoder.weight"].T + w["b_dec"])


@pytest.mark.parametrize("threshold", [0.2, -1.0])
def test_dictionary_learning_batch_topk(tmp_path: Path, threshold: float) -> None:
    # trainers/batch_top_k.py BatchTopKSAE.encode(use_threshold=True): post * (post > threshold); the initial -1
    # means "never estimated", for which steerlib uses per-token top-k
    rng = np.random.default_rng(14)
    w = linear_sd(rng, True) | {"b_dec": rand(rng, D_IN, scale=0.2)}
    sd = {k: t(v) for k, v in w.items()} | {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(threshold)}
    write_dl(tmp_path, "BatchTopKSAE", sd, k=K)
    sae = load_sae(tmp_path)
    assert isinstance(sae, BatchTopKSae)
    assert (sae.threshold is None) is (threshold < 0)
    x = rand(rng, 6, D_IN, scale=1.0)
    post = relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    z = post * (post > threshold) if threshold >= 0 else topk_dense(post, K)
    check(sae, x, z, z @ w["decoder.weight"].T + w["b_dec"])


def test_dictionary_learning_jumprelu(tmp_path: Path) -> None:
    # dictionary.py JumpReluAutoEncoder: relu(pre * (pre > threshold)), pre = x @ W_enc + b_enc (no centring)
    rng = np.random.default_rng(15)
    w = gemma_params(rng)
    write_dl(tmp_path, "JumpReluAutoEncoder", {k: t(v) for k, v in w.items()})
    sae = load_sae(tmp_path)
    assert isinstance(sae, JumpReluSae) and not sae.subtract_b_dec
    x = rand(rng, 6, D_IN, scale=1.0)
    pre = x @ w["W_enc"] + w["b_enc"]
    z = relu(pre * (pre > w["threshold"]))
    check(sae, x, z, z @ w["W_dec"] + w["b_dec"])


def test_dictionary_learning_gated(tmp_path: Path) -> None:
    # dictionary.py GatedAutoEncoder: x_enc = encoder(x - decoder_bias); f = (x_enc + gate_bias > 0) *
    # relu(exp(r_mag) * x_enc + mag_bias); decode decoder(f) + decoder_bias
    rng = np.random.default_rng(16)
    w = {
        "decoder_bias": rand(rng, D_IN, scale=0.2),
        "encoder.weight": rand(rng, D_SAE, D_IN),
        "r_mag": rand(rng, D_SAE, scale=0.3),
        "gate_bias": rand(rng, D_SAE, scale=0.2),
        "mag_bias": rand(rng, D_SAE, scale=0.2),
        "decoder.weight": rand(rng, D_IN, D_SAE),
    }
    write_dl(tmp_path, "GatedAutoEncoder", {k: t(v) for k, v in w.items()})
    sae = load_sae(tmp_path)
    assert isinstance(sae, GatedSae) and sae.subtract_b_dec
    x = rand(rng, 6, D_IN, scale=1.0)
    x_enc = (x - w["decoder_bias"]) @ w["encoder.weight"].T
    z = ((x_enc + w["gate_bias"]) > 0) * relu(np.exp(w["r_mag"]) * x_enc + w["mag_bias"])
    check(sae, x, z, z @ w["decoder.weight"].T + w["decoder_bias"])


def test_dictionary_learning_matryoshka_batch_topk(tmp_path: Path) -> None:
    # trainers/matryoshka_batch_top_k.py: bare W_enc/W_dec Parameters, relu((x - b_dec) @ W_enc + b_enc) > threshold
    rng = np.random.default_rng(18)
    w = gemma_params(rng)
    del w["threshold"]
    sd = {k: t(v) for k, v in w.items()} | {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.25)}
    sd["group_sizes"] = torch.tensor([4, 12])
    write_dl(tmp_path, "MatryoshkaBatchTopKSAE", sd, k=K)
    sae = load_sae(tmp_path)
    assert isinstance(sae, BatchTopKSae) and sae.threshold is not None and sae.subtract_b_dec
    x = rand(rng, 6, D_IN, scale=1.0)
    post = relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    z = post * (post > 0.25)
    check(sae, x, z, z @ w["W_dec"] + w["b_dec"])


def test_dictionary_learning_autoencoder_new(tmp_path: Path) -> None:
    # dictionary.py AutoEncoderNew: relu(encoder(x)), decoder(f) with its own bias; no input centring
    rng = np.random.default_rng(19)
    w = linear_sd(rng, False) | {"decoder.bias": rand(rng, D_IN, scale=0.2)}
    write_dl(tmp_path, "AutoEncoderNew", {k: t(v) for k, v in w.items()})
    sae = load_sae(tmp_path)
    assert isinstance(sae, ReluSae) and not sae.subtract_b_dec
    x = rand(rng, 6, D_IN, scale=1.0)
    z = relu(x @ w["encoder.weight"].T + w["encoder.bias"])
    check(sae, x, z, z @ w["decoder.weight"].T + w["decoder.bias"])


def test_dictionary_learning_unexpected_tensor_is_named(tmp_path: Path) -> None:
    w = gemma_params(np.random.default_rng(0))
    write_dl(tmp_path, "JumpReluAutoEncoder", {k: t(v) for k, v in w.items()} | {"extra": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected tensors for JumpReluAutoEncoder: \['extra'\]"):
        load_sae(tmp_path)


def test_dictionary_learning_k_must_agree(tmp_path: Path) -> None:
    w = linear_sd(np.random.default_rng(0), True) | {"b_dec": np.zeros(D_IN, np.float32)}
    write_dl(tmp_path, "AutoEncoderTopK", {k: t(v) for k, v in w.items()} | {"k": torch.tensor(4)}, k=5)
    with pytest.raises(ValueError, match=r"config.json k=5 != 4=state_dict\['k'\]"):
        load_sae(tmp_path)


def test_dictionary_learning_unknown_class_lists_supported(tmp_path: Path) -> None:
    write_dl(tmp_path, "IdentityDict", {})
    with pytest.raises(ValueError, match="dict_class 'IdentityDict' is not supported; supported: AutoEncoder,"):
        load_sae(tmp_path)


def _side_effect(path: str) -> dict[str, torch.Tensor]:
    Path(path).write_text("ran")
    return {}


class _Payload:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _side_effect, (str(self.path),)


def test_pickled_code_in_ae_pt_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    write_dl(tmp_path / "sae", "AutoEncoder", {})
    torch.save(_Payload(marker), tmp_path / "sae" / "ae.pt")
    with pytest.raises(ValueError, match="refused to load: it is not a plain tensor state dict"):
        load_sae(tmp_path / "sae")
    assert not marker.exists()


# -- steerlib's own format -------------------------------------------------------------------------
def random_sae(arch: str, *, skip: bool = False, threshold: bool = True, dtype: torch.dtype = torch.float32) -> Sae:
    d_out = 6 if skip else D_IN
    meta = SaeMeta(arch, D_IN, D_SAE, d_out, "blocks.1.hook_mlp_in" if skip else "blocks.1.hook_resid_post",
                   "blocks.1.hook_mlp_out" if skip else "blocks.1.hook_resid_post", "tiny",
                   K if arch in ("topk", "batchtopk") else None, "sparsify", transcoder=skip)  # fmt: skip
    names = {"W_skip"} if skip else set()
    names |= {"threshold"} if threshold else set()
    sae = get_architecture(arch).for_tensors(meta, names, subtract_b_dec=not skip, dtype=dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    return sae


ROUND_TRIPS = [
    pytest.param("relu", {}, id="relu"),
    pytest.param("topk", {}, id="topk"),
    pytest.param("batchtopk", {}, id="batchtopk"),
    pytest.param("batchtopk", {"threshold": False}, id="batchtopk-no-threshold"),
    pytest.param("jumprelu", {}, id="jumprelu"),
    pytest.param("gated", {}, id="gated"),
    pytest.param("relu", {"skip": True}, id="skip-transcoder"),
    pytest.param("jumprelu", {"dtype": torch.bfloat16}, id="jumprelu-bf16"),
]


@pytest.mark.parametrize(("arch", "opts"), ROUND_TRIPS)
def test_own_format_round_trips_exactly(tmp_path: Path, arch: str, opts: dict[str, Any]) -> None:
    sae = random_sae(arch, **opts)
    save_sae(sae, tmp_path / "sae")
    assert sorted(os.listdir(tmp_path)) == ["sae"]  # no temporary folder left behind
    assert sorted(os.listdir(tmp_path / "sae")) == ["cfg.json", "sae.safetensors"]
    back = load_sae(tmp_path / "sae")
    assert type(back) is type(sae)
    assert back.meta == sae.meta and back.subtract_b_dec == sae.subtract_b_dec
    assert back.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert back.state_dict()[name].dtype == tensor.dtype
        assert torch.equal(back.state_dict()[name], tensor), name
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        assert torch.equal(back(x), sae(x))


def test_compressed_weights_round_trip_exactly_and_are_smaller(tmp_path: Path) -> None:
    sae = random_sae("topk", dtype=torch.bfloat16)
    save_sae(sae, tmp_path / "plain")
    save_sae(sae, tmp_path / "xz", compress=True)
    assert sorted(os.listdir(tmp_path / "xz")) == ["cfg.json", "sae.safetensors.xz"]
    assert (tmp_path / "xz" / "cfg.json").read_text() == (tmp_path / "plain" / "cfg.json").read_text()
    packed, plain = (tmp_path / "xz" / "sae.safetensors.xz"), (tmp_path / "plain" / "sae.safetensors")
    assert packed.stat().st_size < plain.stat().st_size
    back = load_sae(tmp_path / "xz")
    for name, tensor in sae.state_dict().items():
        assert back.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(back.state_dict()[name], tensor), name


def test_compressed_weights_errors_are_named(tmp_path: Path) -> None:
    save_sae(random_sae("relu"), tmp_path / "sae", compress=True)
    (tmp_path / "sae" / "sae.safetensors.xz").write_bytes(b"not xz")
    with pytest.raises(ValueError, match="not a valid xz-compressed safetensors file"):
        load_sae(tmp_path / "sae")
    save_sae(random_sae("relu"), tmp_path / "both")
    save_sae(random_sae("relu"), tmp_path / "other", compress=True)
    os.rename(tmp_path / "other" / "sae.safetensors.xz", tmp_path / "both" / "sae.safetensors.xz")
    with pytest.raises(ValueError, match=r"holds both sae\.safetensors and sae\.safetensors\.xz; keep one"):
        load_sae(tmp_path / "both")


def test_own_format_config_fields(tmp_path: Path) -> None:
    save_sae(random_sae("batchtopk"), tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text()) == {
        "format_version": 1, "architecture": "batchtopk", "d_in": 8, "d_sae": 16, "d_out": 8, "k": 4,
        "threshold": "global", "subtract_b_dec": True, "skip": False, "transcoder": False,
        "input_site": "blocks.1.hook_resid_post", "output_site": "blocks.1.hook_resid_post", "model": "tiny",
        "source_format": "sparsify",
    }  # fmt: skip


def test_save_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    first, second = random_sae("relu"), random_sae("relu")
    save_sae(first, tmp_path / "sae")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_sae(second, tmp_path / "sae")
    assert torch.equal(load_sae(tmp_path / "sae").W_enc, first.W_enc)
    save_sae(second, tmp_path / "sae", overwrite=True)
    assert torch.equal(load_sae(tmp_path / "sae").W_enc, second.W_enc)
    assert sorted(os.listdir(tmp_path)) == ["sae"]


def test_own_format_rejects_unknown_config_keys(tmp_path: Path) -> None:
    save_sae(random_sae("relu"), tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text()) | {"subtract_bdec": True}
    write_json(tmp_path / "sae" / "cfg.json", cfg)
    with pytest.raises(ValueError, match="subtract_bdec"):
        load_sae(tmp_path / "sae")


def test_saelens_to_own_format_keeps_outputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(17)
    write_json(tmp_path / "in" / "cfg.json", saelens_v6_cfg("gated"))
    write_safetensors(tmp_path / "in" / "sae_weights.safetensors", saelens_weights(rng, "gated"))
    sae = load_sae(tmp_path / "in")
    save_sae(sae, tmp_path / "out")
    back = load_sae(tmp_path / "out")
    assert back.meta == sae.meta and back.meta.source_format == "saelens"
    x = torch.from_numpy(rand(rng, 6, D_IN, scale=1.0))
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))


# -- detection -------------------------------------------------------------------------------------
def test_unknown_folder_names_files_and_formats(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError) as info:
        load_sae(tmp_path)
    msg = str(info.value)
    assert f"unrecognised SAE folder {tmp_path}: files seen: ['notes.txt', 'sub/', 'weights.bin']" in msg
    for fmt in (
        "steerlib (cfg.json with format_version + sae.safetensors (or sae.safetensors.xz))",
        "saelens (cfg.json + sae_weights",
        "sparsify (cfg.json + sae.safetensors",
        "gemma_scope (params.npz)",
        "dictionary_learning (ae.pt",
    ):
        assert fmt in msg


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "nope")


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    p = gemma_params(np.random.default_rng(0))
    p["threshold"] = p["threshold"][:-1]
    write_npz(tmp_path / "params.npz", p)
    with pytest.raises(ValueError, match=r"tensor threshold has shape \(15,\), expected \(16,\)"):
        load_sae(tmp_path)


def test_device_argument_moves_weights(tmp_path: Path) -> None:
    write_npz(tmp_path / "params.npz", gemma_params(np.random.default_rng(0)))
    assert load_sae(tmp_path, device="cpu").W_dec.device == torch.device("cpu")


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import steerlib.sae.formats.native as native

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_sae(random_sae("relu"), tmp_path / "sae")
    assert os.listdir(tmp_path) == []
