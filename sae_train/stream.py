"""Training batches harvested on the fly, without an activation cache on disk: model -> shuffle buffer -> trainer.

``activations.cache: false`` trains from :class:`StreamBatches`: each forward pass of the model over a few contexts
(:func:`sae_train.activations.harvest`) feeds a :class:`~sae_train.activations.ShuffleBuffer` (the streaming setup of
SAELens' ActivationsStore and of sparsify), whose random batches go straight into the optimizer. Nothing is written
to disk, so a run needs neither the disk space nor the time of a cache pass, at the price of running the model
again for every epoch and for a resume.

Determinism, as with the cache: the harvest of fixed contexts is deterministic and the buffer is seeded with
``(seed, epoch)``, so batch ``i`` is a function of ``(seed, i)``. A resumed run re-harvests and skips the batches it
has already trained on, and continues the same loss curve. Massive-activation tokens are dropped as in
:func:`sae_train.activations.typical_rows`, against the median norm of the stream's first ``norm_sample`` rows.
In data-parallel training each process runs the whole stream and keeps its share of each global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from typing import Any

import torch
from torch import Tensor

from sae_train.activations import ShuffleBuffer

logger = logging.getLogger(__name__)

Chunks = Iterator[dict[str, Tensor]]
"""``{site: (n, D)}`` per model forward pass, as :func:`sae_train.activations.harvest` yields them."""


class StreamBatches:
    """Global training batches ``(x_in, x_out)`` from a fresh harvest per epoch, mixed by a shuffle buffer.

    ``harvest`` starts the stream over from the first context each time it is called (it must be deterministic).
    """

    def __init__(
        self,
        harvest: Callable[[], Chunks],
        input_site: str,
        output_site: str,
        *,
        batch_size: int,
        buffer_rows: int,
        seed: int = 0,
        max_norm_factor: float | None = None,
        norm_sample: int = 4096,
    ) -> None:
        if buffer_rows < 2 * batch_size:
            raise ValueError(
                f"activations.shuffle_buffer={buffer_rows} must be at least 2x the batch size {batch_size}"
            )
        self._harvest, self.input_site, self.output_site = harvest, input_site, output_site
        self.batch_size, self.buffer_rows, self.seed = batch_size, buffer_rows, seed
        self.max_norm_factor, self.norm_sample = max_norm_factor, norm_sample
        self._limit: float | None = None
        self._open: list[Generator[Any, None, None]] = []
        self._batches: Iterator[dict[str, Tensor]] | None = None
        self._next_step = 0

    # -- the first rows, unshuffled: dimensions, scale and b_dec init, the norm limit -------------------
    def head(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` rows of the stream (fewer if the stream is shorter), before filtering and shuffling."""
        got: list[dict[str, Tensor]] = []
        rows = 0
        chunks = self._start()
        try:
            for chunk in chunks:
                got.append(chunk)
                rows += _n_rows(chunk)
                if rows >= n:
                    break
        finally:
            self._close(chunks)
        if not got:
            raise ValueError("the activation stream is empty: the data gave no tokens")
        x_in = torch.cat([c[self.input_site] for c in got])[:n]
        return x_in, torch.cat([c[self.output_site] for c in got])[:n]

    def dims(self) -> tuple[int, int]:
        x_in, x_out = self.head(1)
        return int(x_in.shape[1]), int(x_out.shape[1])

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """Rows for the activation scale and the ``b_dec`` init: the typical ones among the first ``n`` (the first
        contexts, where a cache's init sample is drawn from all rows; the median and the mean norm are robust to it)."""
        x_in, x_out = self.head(n)
        keep = self._typical(x_in)
        return x_in[keep][:n], x_out[keep][:n]

    def norm_limit(self) -> float:
        """Input norm above which a token is left out (inf without ``max_norm_factor``)."""
        if self._limit is None:
            if self.max_norm_factor is None:
                self._limit = float("inf")
            else:
                x_in, _ = self.head(self.norm_sample)
                self._limit = self.max_norm_factor * float(x_in.norm(dim=1).median())
        return self._limit

    def _typical(self, x_in_ND: Tensor) -> Tensor:
        return x_in_ND.norm(dim=1) <= self.norm_limit()

    # -- batches ----------------------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Global batch ``step`` ``(batch_size, D)`` each; any step may be asked for (a resume re-harvests)."""
        if self._batches is None or step != self._next_step:
            if self._batches is not None:
                logger.info("activation stream restarts to reach step %d", step)
            self.close()
            self.norm_limit()  # before the stream starts: two harvests must not run on one model at once
            self._batches = self._epochs()
            for _ in range(step):
                next(self._batches)
        b = next(self._batches)
        self._next_step = step + 1
        return b[self.input_site], b[self.output_site]

    def _epochs(self) -> Iterator[dict[str, Tensor]]:
        epoch = 0
        while True:
            buffer = ShuffleBuffer(self.buffer_rows, self.batch_size, seed=self.seed * 1_000_003 + epoch)
            chunks = self._start()
            n = 0
            for b in buffer.batches(self._filtered(chunks)):
                n += 1
                yield b
            self._close(chunks)
            if n == 0:
                raise ValueError(f"the activation stream has fewer than batch_size={self.batch_size} tokens")
            epoch += 1
            logger.info("activation stream: epoch %d done (%d batches), starting over", epoch, n)

    def _filtered(self, chunks: Chunks) -> Chunks:
        for chunk in chunks:
            keep = self._typical(chunk[self.input_site])
            yield chunk if bool(keep.all()) else {s: v[keep] for s, v in chunk.items()}

    # -- the model hooks of a running harvest are removed when its generator closes ----------------------
    def _start(self) -> Chunks:
        chunks = self._harvest()
        if isinstance(chunks, Generator):
            self._open.append(chunks)
        return chunks

    def _close(self, chunks: Chunks) -> None:
        if isinstance(chunks, Generator):
            chunks.close()
            if chunks in self._open:
                self._open.remove(chunks)

    def close(self) -> None:
        """Stop any running harvest (its recording hooks leave the model). Safe to call twice."""
        if self._batches is not None and isinstance(self._batches, Generator):
            self._batches.close()
        self._batches = None
        for g in list(self._open):
            self._close(g)


def _n_rows(chunk: dict[str, Tensor]) -> int:
    return int(next(iter(chunk.values())).shape[0])
