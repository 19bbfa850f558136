"""The server's decode loop against HF ``generate`` under the same per-row steering, on several architectures:
left padding, the KV cache and steerlib's prompt/generated bookkeeping must give the same greedy tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_server_support import D
from tiny_models import EOS_ID as EOS
from tiny_models import tiny_model, word_tokenizer

from servers.decode import run_batch
from servers.jobs import Finished, GenRequest
from servers.sampling import SamplingParams
from steerlib import SteeringConfig, steer
from steerlib.extract.activations import left_pad

PROMPTS = [[1, 2, 10, 11, 12, 3], [1, 2, 40, 3], [1, 2, 50, 51, 52, 53, 54, 55, 3]]
N_NEW = 8


def configs() -> list[SteeringConfig | None]:
    gen = torch.Generator().manual_seed(5)
    v, w = (torch.randn(D, generator=gen) * 4).tolist(), (torch.randn(D, generator=gen) * 12).tolist()
    return [
        None,
        SteeringConfig.model_validate({"interventions": [{"op": "add", "layer": 1, "vector": v}]}),
        SteeringConfig.model_validate(
            {
                "interventions": [
                    {"op": "ablate", "layer": "all", "vector": v},
                    {"op": "add", "layer": 2, "vector": w, "apply": {"tokens": "generated"}},
                ]
            }
        ),
    ]


def served(model: torch.nn.Module, cfgs: list[SteeringConfig | None]) -> list[str]:
    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        reqs = [
            GenRequest(p, c, SamplingParams(0.0, 1.0, None, N_NEW), loop) for p, c in zip(PROMPTS, cfgs, strict=True)
        ]
        await asyncio.to_thread(run_batch, model, word_tokenizer(), reqs, frozenset({EOS}), 0)
        out = []
        for r in reqs:
            while not isinstance(event := await r.queue.get(), Finished):
                pass
            out.append(event.text)
        return out

    return asyncio.run(run())


def generated(model: torch.nn.Module, cfgs: list[SteeringConfig | None]) -> list[str]:
    ids, mask = left_pad(PROMPTS, 0, torch.device("cpu"))
    with torch.no_grad(), steer(model, cfgs):
        out = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0
        )
    tok = word_tokenizer()
    return [str(tok.decode(row[ids.shape[1] :], skip_special_tokens=True)) for row in out]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "qwen3"])
def test_decode_loop_equals_generate_with_per_row_steering(arch: str) -> None:
    model = tiny_model(arch, 3)
    cfgs = configs()
    ours = served(model, cfgs)
    assert ours == generated(model, cfgs)
    plain = served(model, [None, None, None])
    assert ours[0] == plain[0]  # the unsteered row is untouched by its neighbours' steering
    assert ours[1] != plain[1] and ours[2] != plain[2]  # and the steered rows really were steered
