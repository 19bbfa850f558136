"""One batch of requests decoded together: one forward per step over all rows, each row with its own steering.

The prompts are left padded; ``steerlib.steer(model, [cfg_or_None per row])`` installs every row's steering for the
whole batch; the loop calls the model with ``input_ids``, ``attention_mask``, ``position_ids`` and the KV cache
just as ``generate`` does, so steerlib's hooks see prompt and generated tokens correctly. Each row samples with its
own parameters and stops on its own (EOS, stop sequence, ``max_tokens``, cancellation); a finished row stays in the
batch (its outputs are ignored) because steerlib's per-row plan is bound to the batch's rows. Rows that ask for
log-probabilities get them from the logits they were sampled from (``servers.logprobs``); an echoed prompt's come
from the prefill, which reads the prompt as the prompt (a prompt-scoped policy applies to it).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from servers.audit import row_record, row_tokens
from servers.jobs import Finished, GenRequest
from servers.logprobs import TokenLogprob, logprobs_of, prompt_logprobs
from servers.sampling import RowSampler, TextTracker
from steerlib.extract.activations import left_pad, model_device
from steerlib.hf.hooks import SteeringHandle, steer
from steerlib.hf.recording import Recording, record
from steerlib.hf.refusal import ForcedRefusal, refusals
from steerlib.plan import Resources, TokenizerLike
from steerlib.sites import tl_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Auditor:
    """Builds a row's audit record (:mod:`servers.audit`) from the batch's steering once the row is done."""

    handle: SteeringHandle | None
    device: torch.device

    def record(self, row: int, req: GenRequest, fed_ids: list[int]) -> list[dict[str, Any]]:
        if self.handle is None or req.steering is None:
            return []
        tb = row_tokens(req.prompt_ids, fed_ids, self.device)
        return row_record(self.handle.plan, self.handle.state, row, tb, req.sources)


@dataclass
class _Row:
    req: GenRequest
    sampler: RowSampler
    tracker: TextTracker
    eos_ids: frozenset[int]
    index: int = 0
    auditor: Auditor | None = None
    recording: Recording | None = None
    """The batch's recording, when some row asked for activations."""
    text: list[str] = field(default_factory=list)
    refused_by: str | None = None
    """The steering config's ``refuse`` detector that answered this row, if one fired on its prompt."""
    chosen: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_finite: bool = True
    n_new: int = 0
    last: int = 0
    done: bool = False

    def step(self, logits_V: Tensor, finite: bool = True) -> int:
        """Choose this row's next token; emit its text; decide whether the row is finished. A row whose logits are
        not ``finite`` finishes alone with an error (NaN or inf stays in its own row: rows never mix)."""
        if self.done:
            return self.last
        if self.req.cancelled.is_set():
            self._finish("cancelled")
            return self.last
        if not (finite and self.prompt_finite):
            self._fail(
                f"generation stopped after {self.n_new} token(s): this request's logits became NaN or infinite "
                "(its steering drove the activations beyond what the model's dtype holds; lower its coefficients "
                "or edit values)"
            )
            return self.last
        if self.n_new >= self.req.params.max_tokens:  # max_tokens 0: the echoed prompt's scores only
            self._finish("length")
            return self.last
        self.last = self.sampler.choose(logits_V)
        self.chosen.append(self.last)
        self.n_new += 1
        self._report(logits_V)
        if self.last in self.eos_ids:
            self._finish("stop")
            return self.last
        self._emit(self.tracker.push(self.last))
        if self.tracker.stopped:
            self._finish("stop")
        elif self.n_new >= self.req.params.max_tokens:
            self._emit(self.tracker.flush())
            self._finish("length")
        return self.last

    def score_prompt(self, logits_TV: Tensor) -> None:
        """The echoed prompt's log-probabilities from the prefill's logits over this row's prompt positions."""
        self.prompt_finite = all(finite_rows(logits_TV))
        if self.prompt_finite:
            self.prompt_logprobs = prompt_logprobs(logits_TV, self.req.prompt_ids, self.req.params.logprobs or 0)

    def _report(self, logits_V: Tensor) -> None:
        top = self.req.params.logprobs
        if top is None:
            return
        (entry,) = logprobs_of(logits_V[None], [self.last], top)
        self.logprobs.append(entry)
        self.req.emit(entry)  # before the token's text: a stream sends it with that text (or later)

    def _emit(self, delta: str) -> None:
        if delta:
            self.text.append(delta)
            self.req.emit(delta)

    def _finish(self, reason: str) -> None:
        if reason == "stop" and not self.tracker.stopped:
            self._emit(self.tracker.flush())
        self._end(reason, None)

    def _fail(self, message: str) -> None:
        self._end("error", message)

    def _end(self, reason: str, error: str | None) -> None:
        self.done = True
        audit = None
        if self.req.audit and self.auditor is not None:
            audit = self.auditor.record(self.index, self.req, self.chosen[:-1])  # the last choice was never fed
        text, n_prompt = "".join(self.text), len(self.req.prompt_ids)
        lps, prompt_lps = tuple(self.logprobs), tuple(self.prompt_logprobs)
        acts = None if self.recording is None or not self.req.capture else row_activations(self.recording, self)
        self.req.emit(
            Finished(text, reason, n_prompt, self.n_new, self.refused_by, error, audit, lps, prompt_lps, acts)
        )


def row_activations(rec: Recording, row: _Row) -> dict[str, tuple[Tensor, Tensor]]:
    """The row's recorded tokens at each site it asked for: positions (0 = its first prompt token) and activations."""
    mine = rec.rows == row.index
    out = {}
    for layer, site in row.req.capture:
        name = tl_name(layer, site)
        out[name] = (rec.positions[mine], rec[name][mine])
    return out


def finite_rows(logits_BV: Tensor) -> list[bool]:
    """Per row: are its logits usable (no NaN, no +inf, not all -inf)?"""
    bad_B = logits_BV.isnan().any(-1) | logits_BV.isposinf().any(-1) | logits_BV.isneginf().all(-1)
    return [not b for b in bad_B.tolist()]


def cache_keyword(model: nn.Module) -> str:
    """The keyword the model takes its KV cache by (and names it by in its output): ``cache`` from transformers 5.25
    on, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def run_batch(
    model: nn.Module,
    tokenizer: TokenizerLike,
    reqs: Sequence[GenRequest],
    eos_ids: frozenset[int],
    pad_id: int,
    resources: Resources | None = None,
) -> int:
    """Decode ``reqs`` to the end; every request gets its deltas and one Finished event. Returns decode steps."""
    rows = [
        _Row(r, RowSampler(r.params), TextTracker(tokenizer, r.params.stop), eos_ids, b) for b, r in enumerate(reqs)
    ]
    device = model_device(model)
    ids_BT, mask_BT = left_pad([r.prompt_ids for r in reqs], pad_id, device)
    configs = [r.steering for r in reqs]
    steps = 0
    cache_kw = cache_keyword(model)
    forced: ForcedRefusal | None = None
    with ExitStack() as stack, torch.no_grad():
        handle = None
        if any(c is not None for c in configs):
            handle = stack.enter_context(steer(model, configs, tokenizer=tokenizer, resources=resources))
            if handle.plan.detectors:
                forced = ForcedRefusal(handle, tokenizer)
        auditor = Auditor(handle, device)
        capture = tuple(dict.fromkeys(site for r in reqs for site in r.capture))
        recording = stack.enter_context(record(model, capture)) if capture else None  # after steering: reads its result
        for r in rows:
            r.auditor, r.recording = auditor, recording
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT, use_cache=True)
        if forced is not None:  # detectors decided on the prompts during that prefill
            for row, refusal in refusals(forced.handle).items():
                rows[row].refused_by = refusal.detector
        for b, r in enumerate(rows):
            if r.req.params.echo_logprobs:  # left padded: the row's prompt is its last positions
                r.score_prompt(out.logits[b, -len(r.req.prompt_ids) :])
        while True:
            logits_BV = out.logits[:, -1, :]
            finite_B = finite_rows(logits_BV)
            if forced is not None:
                logits_BV = forced(ids_BT, logits_BV)
            next_B = [row.step(logits_BV[b], finite_B[b]) for b, row in enumerate(rows)]
            steps += 1
            if all(row.done for row in rows):
                return steps
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones(len(rows), 1)], dim=1)
            pos_BT = pos_BT[:, -1:] + 1
            out = model(
                input_ids=torch.tensor(next_B, device=device)[:, None],
                attention_mask=mask_BT,
                position_ids=pos_BT,
                use_cache=True,
                **{cache_kw: out[cache_kw]},
            )
