"""ReFAT training mechanics on a tiny seeded Llama: the refusal feature is recomputed, ablation reaches the drawn
batches' harmful rows only, the loss falls, and the saved adapter loads through load_model and changes outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer
from torch import nn

from evals.recipes.refat import RefatConfig, base_logits_of, batch_loss, train, with_lora
from evals.recipes.refat_ablation import ablated, refusal_features
from evals.recipes.refat_data import REFUSALS, Example, encode, refusal_for
from steerlib.hf.layout import get_layout
from steerlib.hf.loading import load_model

HARMFUL = [Example(f"w{10 + i} w{11 + i} w{12 + i}", "w50 w51", True) for i in range(6)]
HARMLESS = [Example(f"w{30 + i} w{31 + i}", "w60 w61 w62", False) for i in range(6)]
CPU = torch.device("cpu")


def cfg(**kw: object) -> RefatConfig:
    base: dict[str, object] = {
        "lora_rank": 4,
        "lr": 1e-2,
        "steps": 6,
        "batch_harmful": 2,
        "batch_harmless": 2,
        "refresh_every": 2,
        "direction_prompts": 4,
        "target_modules": ("q_proj", "v_proj", "down_proj"),
    }
    return RefatConfig.model_validate(base | kw)


def lora_model(seed: int = 0) -> nn.Module:
    return with_lora(tiny_model("llama", n_layers=3, seed=seed), cfg())


def test_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="p_ablation"):
        RefatConfig.model_validate({"p_ablation": 0.5})


def test_encode_scores_the_target_and_end_of_turn_only() -> None:
    tok = word_tokenizer()
    b = encode(tok, [HARMFUL[0], HARMLESS[0]], CPU)
    # row 0: "<s> <user> w10 w11 w12 <assistant>" + "w50 w51" + eos; row 1 is one token shorter (left padded)
    assert b.ids_BT.shape == (2, 9)
    assert b.labels_BT[0].tolist() == [-100] * 6 + [50, 51, tok.eos_token_id]
    assert b.labels_BT[1].tolist() == [-100] * 5 + [60, 61, 62, tok.eos_token_id]
    assert b.harmful_B.tolist() == [True, False]


def test_refusal_for_is_a_fixed_template_per_prompt() -> None:
    assert refusal_for("how to x") == refusal_for("how to x")
    assert {refusal_for(f"prompt {i}") for i in range(50)} == set(REFUSALS)


def test_ablation_removes_the_feature_from_drawn_rows_only() -> None:
    model = lora_model()
    tok = word_tokenizer()
    layout = get_layout(model)
    feats = refusal_features(model, tok, [e.prompt for e in HARMFUL], [e.prompt for e in HARMLESS])
    assert feats.shape == (3, 64) and bool((feats.norm(dim=-1) > 0).all())
    b = encode(tok, [HARMFUL[0], HARMLESS[0]], CPU)
    n_hooks = len(layout.layer(0)._forward_hooks)
    outs: dict[int, torch.Tensor] = {}

    def keep(i: int) -> object:
        return lambda m, a, o: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)

    with torch.no_grad():
        plain = model(input_ids=b.ids_BT, attention_mask=b.mask_BT).logits
        with ablated(model, feats, torch.tensor([True, False])):
            # registered after the ablation hooks, so these see the ablated outputs
            hooks = [layout.layer(i).register_forward_hook(keep(i)) for i in range(3)]  # type: ignore[arg-type]
            abl = model(input_ids=b.ids_BT, attention_mask=b.mask_BT).logits
            for h in hooks:
                h.remove()
    unit = feats / feats.norm(dim=-1, keepdim=True)
    for i in range(3):  # ablated row: no component along its layer's feature, at every position
        assert float((outs[i][0] @ unit[i]).abs().max()) < 1e-4
        assert float((outs[i][1] @ unit[i]).abs().max()) > 1e-2
    torch.testing.assert_close(abl[1], plain[1])  # the row not drawn is untouched
    assert float((abl[0] - plain[0]).abs().max()) > 1e-3
    assert len(layout.layer(0)._forward_hooks) == n_hooks  # ours removed


def test_training_recomputes_the_feature_ablates_when_drawn_and_lowers_the_loss() -> None:
    tok = word_tokenizer()
    model = lora_model()
    before = refusal_features(model, tok, [e.prompt for e in HARMFUL], [e.prompt for e in HARMLESS])
    log = train(model, tok, HARMFUL, HARMLESS, cfg(steps=30, p_ablate=0.5))
    assert log.refreshed_at == list(range(0, 30, 2))
    assert 0 < sum(log.ablated) < 30
    # the tiny model's random unit-scale head bounds its logits (loss floor near 3.6 nats); the fall is what counts
    assert sum(log.losses[-5:]) / 5 < 0.85 * sum(log.losses[:5]) / 5
    after = refusal_features(model, tok, [e.prompt for e in HARMFUL], [e.prompt for e in HARMLESS])
    assert float((after - before).norm()) > 1e-3  # the model moved, so a recomputed feature differs


def test_an_ablated_batch_has_another_loss_than_the_same_batch_unablated() -> None:
    tok = word_tokenizer()
    logs = {p: train(lora_model(), tok, HARMFUL, HARMLESS, cfg(steps=1, p_ablate=p)) for p in (0.0, 1.0)}
    assert logs[0.0].ablated == [False] and logs[1.0].ablated == [True]
    # same seed, same batch: only the ablation differs, and it changes the harmful rows' loss
    assert abs(logs[0.0].harmful_losses[0] - logs[1.0].harmful_losses[0]) > 1e-4


def test_kl_retention_starts_at_zero_and_holds_harmless_rows_closer_to_the_base_than_ce() -> None:
    tok = word_tokenizer()
    batch = encode(tok, [HARMFUL[0], HARMLESS[0], HARMLESS[1]], CPU)
    fresh = lora_model()  # LoRA's B starts at zero: the adapted model is the base
    with torch.no_grad():
        loss, harm = batch_loss(fresh, batch, base_logits_of(fresh, batch))
    assert abs(float(loss) - float(harm)) < 1e-5  # the KL term is zero, the loss is the refusal CE alone

    def harmless_kl(model: nn.Module) -> float:
        b = encode(tok, HARMLESS, CPU)
        with torch.no_grad():
            base = base_logits_of(model, b)
            loss, _ = batch_loss(model, b, base)  # harmless rows only: the loss is their mean KL
        return float(loss)

    trained = {}
    for retain in ("ce", "kl"):
        model = lora_model()
        log = train(model, tok, HARMFUL, HARMLESS, cfg(steps=20, p_ablate=0.0, retain=retain))
        assert log.harmful_losses[-1] < log.harmful_losses[0]  # both learn the refusals
        trained[retain] = harmless_kl(model)
    assert 0 < trained["kl"] < 0.7 * trained["ce"]  # seeded: 0.018 vs 0.030


def test_answer_only_kl_is_the_mean_kl_at_the_positions_that_predict_the_answer() -> None:
    tok = word_tokenizer()
    model = lora_model()
    train(model, tok, HARMFUL, HARMLESS, cfg(steps=3, p_ablate=0.0, retain="kl_answer"))  # adapters now nonzero
    b = encode(tok, HARMLESS[:3], CPU)
    with torch.no_grad():
        base = base_logits_of(model, b)
        loss, _ = batch_loss(model, b, base, answer_only=True)
        everywhere, _ = batch_loss(model, b, base)
        tuned = model(input_ids=b.ids_BT, attention_mask=b.mask_BT).logits
    by_hand = []
    for row in range(3):
        for t in (b.labels_BT[row, 1:] != -100).nonzero().flatten().tolist():  # position t predicts token t + 1
            p, q = base[row, t].log_softmax(-1), tuned[row, t].log_softmax(-1)
            by_hand.append(float((p.exp() * (p - q)).sum()))
    assert len(by_hand) == 3 * 4  # "w60 w61 w62" + end of turn, per row
    assert float(loss) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4)
    assert float(loss) != pytest.approx(float(everywhere), rel=1e-2)  # the prompt's positions are left out


def test_kl_retention_needs_a_peft_model() -> None:
    model = tiny_model("llama", n_layers=2)
    with pytest.raises(ValueError, match="retain='kl' / 'kl_answer' needs a peft model"):
        train(model, word_tokenizer(), HARMFUL, HARMLESS, cfg(retain="kl"))


def test_training_without_adapters_is_an_error() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        model = tiny_model("llama", n_layers=2)
        model.requires_grad_(False)
        train(model, word_tokenizer(), HARMFUL, HARMLESS, cfg())


def test_saved_adapter_loads_through_load_model_and_changes_outputs(tmp_path: Path) -> None:
    base_dir = tmp_path / "tiny"
    tiny_model("llama", n_layers=3).save_pretrained(base_dir)
    word_tokenizer().save_pretrained(base_dir)
    base, tok = load_model(str(base_dir))
    model = with_lora(base, cfg())
    train(model, tok, HARMFUL, HARMLESS, cfg(steps=10))
    model.save_pretrained(str(tmp_path / "adapter"))  # type: ignore[operator]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    merged, _ = load_model(str(tmp_path / "adapter"))
    fresh, _ = load_model(str(base_dir))
    b = encode(tok, [HARMFUL[0], HARMLESS[0]], CPU)
    with torch.no_grad():
        trained_logits = model(input_ids=b.ids_BT, attention_mask=b.mask_BT).logits
        merged_logits = merged(input_ids=b.ids_BT, attention_mask=b.mask_BT).logits
        fresh_logits = fresh(input_ids=b.ids_BT, attention_mask=b.mask_BT).logits
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(merged_logits, trained_logits, rtol=1e-4, atol=1e-4)
    assert float((merged_logits - fresh_logits).abs().max()) > 1e-2
    with torch.no_grad():
        loss_merged, _ = batch_loss(merged, b)
        loss_fresh, _ = batch_loss(fresh, b)
    assert float(loss_merged) < float(loss_fresh)


def test_eval_arms_include_the_random_ablation_control_and_the_base_direction_attack() -> None:
    from evals.recipes.refat_eval import ModelArms, arms_of, transfer_arm
    from steerlib.config import SteeringConfig

    d = 16  # arms only read the models' directions
    refat = ModelArms("refat", nn.Identity(), torch.arange(1.0, d + 1))
    base = ModelArms("base", nn.Identity(), torch.ones(d))
    steer = SteeringConfig.model_validate({"interventions": [{"op": "add", "layer": 1, "vector": [1.0] * d}]})
    arms = arms_of(refat, steer, "steer")
    assert sorted(arms) == sorted(
        ["refat", "refat+attack", "refat+steer", "refat+steer+attack", "refat+random_ablation"]
    )
    assert [harmful_only for _, harmful_only in arms.values()] == [False, True, False, True, True]

    def ablated(cfg: object) -> torch.Tensor:
        assert isinstance(cfg, SteeringConfig)
        return torch.tensor(cfg.interventions[0].vector)  # type: ignore[union-attr,arg-type]

    rand = ablated(arms["refat+random_ablation"][0].steering)
    assert (
        torch.isclose(rand.norm(), refat.direction.norm())
        and abs(float(torch.cosine_similarity(rand, refat.direction, 0))) < 0.5
    )
    arm, harmful_only = transfer_arm(refat, base)
    assert arm.name == "refat+base_attack" and harmful_only
    assert torch.equal(ablated(arm.steering), base.direction)
