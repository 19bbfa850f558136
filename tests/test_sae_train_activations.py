"""Harvesting through steerlib's recording, the shuffle buffer and the memory-mapped activation cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import BOS_ID, tiny_model

from sae_train.activations import ActivationCache, ShuffleBuffer, harvest, typical_rows
from sae_train.batches import CacheRows, batch_indices, shard
from steerlib.hf.recording import record

SITES = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out"]


def _ids(n: int = 6, t: int = 10) -> torch.Tensor:
    ids = torch.randint(2, 120, (n, t), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = BOS_ID
    return ids


def test_harvest_streams_every_site_of_one_pass_without_bos() -> None:
    model, ids = tiny_model("llama"), _ids()
    chunks = list(harvest(model, ids, SITES, batch_size=4))
    assert len(chunks) == 2  # one per forward pass, every site in each
    with torch.no_grad(), record(model, SITES) as rec:
        model(input_ids=ids)
    keep = rec.positions != 0
    for site in SITES:
        got = torch.cat([c[site] for c in chunks])
        assert got.shape == (6 * 9, 64)
        torch.testing.assert_close(got, rec[site][keep])


def test_cache_round_trip_and_fingerprint(tmp_path: Path) -> None:
    model, ids = tiny_model("llama"), _ids()
    cache = ActivationCache.write(tmp_path / "c", harvest(model, ids, SITES[:2], batch_size=2), 40, fingerprint="a")
    ref = torch.cat([c[SITES[0]] for c in harvest(model, ids, SITES[:2], batch_size=2)])[:40]
    assert len(cache) == 40 and isinstance(cache.array(SITES[0]), __import__("numpy").memmap)
    torch.testing.assert_close(cache.rows(SITES[0], slice(0, 40)), ref)
    assert ActivationCache.find(tmp_path / "c", "a") is not None
    assert ActivationCache.find(tmp_path / "c", "b") is None
    x_in, x_out = CacheRows(cache, SITES[0], SITES[1]).rows(torch.tensor([7, 3]))
    torch.testing.assert_close(x_in, ref[[3, 7]])
    assert not torch.equal(x_in, x_out)
    with pytest.raises(ValueError, match="wanted 1000 tokens but the data gave only 54"):
        ActivationCache.write(tmp_path / "d", harvest(model, ids, SITES[:1]), 1000)
    assert not (tmp_path / "d").exists()


def test_shuffle_buffer_yields_every_row_once_mixed() -> None:
    rows = torch.arange(100.0)[:, None]
    chunks = iter([{"a": rows[i : i + 10], "b": -rows[i : i + 10]} for i in range(0, 100, 10)])
    batches = list(ShuffleBuffer(capacity=40, batch_size=10, seed=0).batches(chunks))
    got = torch.cat([b["a"] for b in batches]).squeeze(1)
    assert sorted(got.tolist()) == list(range(100))
    assert got.tolist() != list(range(100))
    assert all(torch.equal(b["a"], -b["b"]) for b in batches)


def test_batches_are_deterministic_and_shards_partition_them() -> None:
    a, b = batch_indices(7, 32, 1000, seed=3), batch_indices(7, 32, 1000, seed=3)
    assert torch.equal(a, b)
    epoch = torch.cat([batch_indices(i, 100, 1000, seed=3) for i in range(10)])
    assert sorted(epoch.tolist()) == list(range(1000))
    assert torch.equal(torch.cat([shard(a, r, 4) for r in range(4)]), a)


def test_typical_rows_leave_out_massive_activations(tmp_path: Path) -> None:
    x = torch.randn(500, 8)
    x[[17, 333]] *= 1000.0  # two "massive activation" tokens
    cache = ActivationCache.write(tmp_path / "c", iter([{"s": x}]), 500)
    keep = typical_rows(cache, "s", 10.0, chunk=128)
    assert keep.shape == (498,) and 17 not in keep.tolist() and 333 not in keep.tolist()
    rows = CacheRows(cache, "s", "s", keep)
    assert len(rows) == 498
    x_in, _ = rows.rows(torch.tensor([17, 16]))  # positions in the kept list: rows 16 and 18 of the cache
    torch.testing.assert_close(x_in, x[[16, 18]])


def test_a_killed_cache_write_continues_to_the_same_cache(tmp_path: Path) -> None:
    model, ids = tiny_model("llama"), _ids(n=12)
    whole = ActivationCache.write(tmp_path / "whole", harvest(model, ids, SITES[:2], batch_size=2), 100,
                                  fingerprint="f")  # fmt: skip

    def killed_after(n: int):  # type: ignore[no-untyped-def]
        for i, chunk in enumerate(harvest(model, ids, SITES[:2], batch_size=2)):
            if i == n:
                raise KeyboardInterrupt
            yield chunk

    with pytest.raises(KeyboardInterrupt):
        ActivationCache.write(tmp_path / "c", killed_after(3), 100, fingerprint="f")
    assert not (tmp_path / "c").exists()
    done = ActivationCache.resume_rows(tmp_path / "c", 100, "f", "float32")
    assert done == 3 * 2 * 9  # three chunks of two contexts of nine tokens (BOS dropped)
    assert ActivationCache.resume_rows(tmp_path / "c", 100, "other", "float32") == 0
    rest = harvest(model, ids[done // 9 :], SITES[:2], batch_size=2)
    cache = ActivationCache.write(tmp_path / "c", rest, 100, fingerprint="f")
    for site in SITES[:2]:
        torch.testing.assert_close(cache.rows(site, slice(0, 100)), whole.rows(site, slice(0, 100)))
    assert not (tmp_path / ".c.partial").exists()
