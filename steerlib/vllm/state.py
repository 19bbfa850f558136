"""Per-process steering state of a vLLM worker: which request is in which batch row, its plan, this step's tokens.

:class:`~steerlib.vllm.tracker.StepTracker` reports rows added, removed and moved in vLLM's persistent batch; before
each forward the model calls :meth:`SteeringState.begin_step` with the step's flat layout (request ``i`` owns tokens
``query_start_loc[i]:query_start_loc[i+1]``, as in vLLM's attention metadata), and each site op calls
:meth:`SteeringState.run`. Requests with equal configs share one plan and run as one group; a prompt-scoped gate
keeps its per-request verdict in a slot that the request holds from its first step until it finishes.

When a request finishes. vLLM's V1 logits-processor interface reports a row *removed* both when its request finished
and when it was only left out of a step (not scheduled, or preempted); it never says which (vLLM issue #29045). The
model runner does know: it drops its per-request state (which holds the request's ``SamplingParams``) when the
scheduler lists the request in ``finished_req_ids``, and only then. So a row keeps its slot while it is out of the
batch ("parked"), and a ``weakref.finalize`` on that ``SamplingParams`` marks it finished the moment vLLM lets go
of the request; the next batch change or step releases it. Nothing else here holds the params.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from steerlib.plan import BoundOp, ModelSpec, Plan, build_plan
from steerlib.refusal import forced_token, refusal_ids, row_refusal
from steerlib.run_state import RunState
from steerlib.runner import run_site
from steerlib.tokens import TokenBatch
from steerlib.vllm import capture, verdicts
from steerlib.vllm.families import Family
from steerlib.vllm.params import config_key, parse_steering

log = logging.getLogger(__name__)

RESIDUAL_SITES = ("resid_pre", "resid_post")


@dataclass
class _Row:
    key: str
    prompt_len: int
    slot: int
    owner: object = None
    """The request's live output-token list (vLLM passes the same object whenever the request re-enters)."""
    new: bool = True
    returned: bool = False
    """The request left the batch and came back (unscheduled for a while, or preempted: then vLLM may compute its
    prompt again), so which of its tokens are prompt is no longer known on the host."""
    forced: list[int] | None = None
    """Tokens a ``refuse`` detector makes this request emit ([] when none fired; None until its prompt is read)."""
    n_forced: int = 0
    prefill: bool = False
    """The detector that fired is in ``prefill`` mode: once its message is out, the request generates freely."""
    finished: bool = False
    """vLLM has let go of the request (see the module docstring): release its slot once it is out of the batch."""
    tag: str | None = None
    """Where a server that owns the engine wants to hear which detector answered (``steerlib.vllm.verdicts``)."""

    def finish(self) -> None:
        self.finished = True


@dataclass
class _Shared:
    plan: Plan
    state: RunState
    """Its gates' per-slot verdicts (every request with this config holds a slot of its own)."""
    users: int = 0

    @property
    def refuses(self) -> bool:
        """The config has a ``refuse`` op (its rows are checked after their prompt is read)."""
        return bool(self.plan.detectors)


@dataclass(frozen=True)
class _Job:
    idx_N: Tensor | None
    """The group's tokens in the step (None: every token of the step)."""
    ops: tuple[BoundOp, ...]
    tb: TokenBatch
    state: RunState


@dataclass(frozen=True)
class _Capture:
    tag: str
    sites: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class _Read:
    """One request's tokens of this step to hand back at a site."""

    tag: str
    start: int
    end: int
    positions_N: Tensor


@dataclass
class SteeringState:
    """Rows, plans and the current step's per-site jobs of one worker process."""

    spec: ModelSpec
    capacity: int
    tokenizer: Any = None
    """The model's tokenizer (token matching, refusal messages); loaded by ``load_tokenizer`` on first need."""
    load_tokenizer: Callable[[], Any] | None = None
    family: Family | None = None
    """The served model's family: a plan using a site it lacks is refused (the scheduler refuses it first)."""
    rows: dict[int, _Row] = field(default_factory=dict)
    parked: dict[int, _Row] = field(default_factory=dict)
    """Requests out of the batch for now (vLLM drops unscheduled requests from it), by ``id(owner)``, oldest first."""
    plans: dict[str, _Shared] = field(default_factory=dict)
    captures: dict[int, _Capture] = field(default_factory=dict)
    """Batch rows whose activations a server reads (``steerlib.vllm.capture``), steered or not."""
    _free_slots: list[int] = field(default_factory=list)
    _sites: dict[tuple[int, str], list[_Job]] = field(default_factory=dict)
    _reads: dict[tuple[int, str], list[_Read]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._free_slots = list(range(self.capacity - 1, -1, -1))

    # -- batch bookkeeping (from the tracker) --------------------------------------------------------------------

    def add(
        self,
        index: int,
        extra_args: Mapping[str, Any] | None,
        prompt_len: int,
        owner: object = None,
        lifetime: object = None,
    ) -> None:
        """A request entered batch row ``index`` (replacing whatever was there).

        ``owner`` identifies the request across exits and re-entries (vLLM's live output-token list): a request
        that comes back keeps its slot, so a prompt-scoped verdict survives a step it was not scheduled in.
        ``lifetime`` is an object vLLM holds exactly as long as the request lives (its ``SamplingParams``).
        """
        self.remove(index)
        reads = capture.sites_of(extra_args)
        if reads:
            tag = verdicts.tag_of(extra_args)
            if tag is None or not capture.writable(extra_args):
                raise RuntimeError("steerlib: a request reads activations but no server folder takes them")
            self.captures[index] = _Capture(tag, reads)
        back = self.parked.pop(id(owner), None) if owner is not None else None
        if back is not None and back.owner is owner:
            back.returned = True
            self.rows[index] = back
            return
        self._sweep()
        cfg = parse_steering(extra_args)
        if cfg is None:
            return
        key = config_key(cfg)
        if key not in self.plans:
            plan = build_plan(cfg, self.spec, self._tokenizer())
            if self.family is not None:
                self.family.check(site for _, site in plan.ops)
            self.plans[key] = _Shared(plan, plan.new_state())
        self.plans[key].users += 1
        while not self._free_slots and self.parked:
            self._release(self.parked.pop(next(iter(self.parked))))
        if not self._free_slots:
            raise RuntimeError(f"steerlib: more than {self.capacity} steered requests in one batch (max_num_seqs)")
        row = self.rows[index] = _Row(key, prompt_len, self._free_slots.pop(), owner, tag=verdicts.tag_of(extra_args))
        if lifetime is not None:
            weakref.finalize(lifetime, row.finish)

    def _tokenizer(self) -> Any:
        if self.tokenizer is None and self.load_tokenizer is not None:
            self.tokenizer = self.load_tokenizer()
        return self.tokenizer

    def remove(self, index: int) -> None:
        """Row ``index`` left the batch: finished, or only unscheduled this step (then it is parked)."""
        self.captures.pop(index, None)
        row = self.rows.pop(index, None)
        if row is None:
            return
        if row.owner is None or row.finished:
            self._release(row)
        else:
            self.parked[id(row.owner)] = row

    def _sweep(self) -> None:
        """Release parked requests that vLLM has let go of (finished)."""
        for key in [k for k, row in self.parked.items() if row.finished]:
            self._release(self.parked.pop(key))

    def _release(self, row: _Row) -> None:
        self._free_slots.append(row.slot)
        shared = self.plans[row.key]
        shared.users -= 1
        if shared.users == 0:  # the last request with this config finished: free its tensors
            del self.plans[row.key]

    def move(self, src: int, dst: int, swap: bool) -> None:
        """A swap exchanges two rows; a one-way move replaces whatever was at ``dst`` (vLLM's condensing)."""
        if not swap:
            self.remove(dst)  # (vLLM reports it removed and moves onto it; nothing is left there by then)
        for table in (self.rows, self.captures):
            a, b = table.pop(src, None), table.pop(dst, None)
            if a is not None:
                table[dst] = a  # type: ignore[assignment]  # each table keeps its own kind
            if b is not None:
                table[src] = b  # type: ignore[assignment]

    @property
    def active(self) -> bool:
        """Some request in the batch is steered or read."""
        return bool(self.rows or self.captures)

    # -- one forward step (from the model) -----------------------------------------------------------------------

    def begin_step(self, token_ids_N: Tensor | None, positions_N: Tensor, query_start_loc: Tensor) -> None:
        """Describe the step to every site; request ``i`` owns tokens ``query_start_loc[i]:query_start_loc[i+1]``."""
        self._sites, self._reads = {}, {}
        if self.parked:
            self._sweep()
        if not self.active:
            return
        qsl = [int(v) for v in query_start_loc.tolist()]
        self._plan_reads(qsl, positions_N)
        if not self.rows:
            return
        if max(self.rows) >= len(qsl) - 1:
            raise RuntimeError(f"steerlib: steered batch row {max(self.rows)} but the step has {len(qsl) - 1} requests")
        groups: dict[str, list[int]] = {}
        for i in sorted(self.rows):
            groups.setdefault(self.rows[i].key, []).append(i)
        # per-slot facts built on the host, sent to the device in one copy each (the outer forward runs eagerly)
        slot_facts = torch.zeros(2, self.capacity, dtype=torch.long, device="cpu")
        for row in self.rows.values():
            slot_facts[0, row.slot], slot_facts[1, row.slot] = row.prompt_len, int(row.new)
        dev = positions_N.device
        prompt_len_R, new_R = slot_facts.to(dev)
        for key, idxs in groups.items():
            tb, idx_N = self._group_batch(idxs, qsl, token_ids_N, positions_N, prompt_len_R, new_R.bool())
            if idx_N.shape[0] == 0:
                continue
            whole = idx_N.shape[0] == positions_N.shape[0]
            shared = self.plans[key]
            for site_key, ops in shared.plan.ops.items():
                self._sites.setdefault(site_key, []).append(_Job(None if whole else idx_N, ops, tb, shared.state))
        for row in self.rows.values():
            row.new = False

    def _plan_reads(self, qsl: list[int], positions_N: Tensor) -> None:
        for index, cap in self.captures.items():
            if index >= len(qsl) - 1 or qsl[index + 1] == qsl[index]:
                continue  # not in this step
            start, end = qsl[index], qsl[index + 1]
            read = _Read(cap.tag, start, end, positions_N[start:end])
            for site_key in cap.sites:
                self._reads.setdefault(site_key, []).append(read)

    def _group_batch(
        self,
        idxs: list[int],
        qsl: list[int],
        token_ids_N: Tensor | None,
        positions_N: Tensor,
        prompt_len_R: Tensor,
        new_R: Tensor,
    ) -> tuple[TokenBatch, Tensor]:
        host = torch.cat(
            [torch.stack([torch.arange(qsl[i], qsl[i + 1], device="cpu"),
                          torch.full((qsl[i + 1] - qsl[i],), self.rows[i].slot, device="cpu")]) for i in idxs],
            dim=1,
        )  # fmt: skip
        idx_N, row_N = host.to(positions_N.device)
        pos_N = positions_N[idx_N].long()
        tb = TokenBatch(
            row_N=row_N,
            position_N=pos_N,
            is_prompt_N=pos_N < prompt_len_R[row_N],
            prompt_len_R=prompt_len_R,
            token_ids_N=None if token_ids_N is None else token_ids_N[idx_N].long(),
            new_rows_R=new_R,
            has_prompt=any(self._may_read_prompt(self.rows[i], qsl[i + 1] - qsl[i]) for i in idxs),
            has_generated=not all(self.rows[i].new for i in idxs),
        )
        return tb, idx_N

    @staticmethod
    def _may_read_prompt(row: _Row, n_tokens: int) -> bool:
        """Host-side and conservative: a request may have prompt tokens in a step unless it is decoding one token
        after producing output, and has not left the batch since (a preempted request computes its prompt again)."""
        produced = row.owner is not None and len(row.owner) > 0  # type: ignore[arg-type]
        return n_tokens > 1 or not produced or row.returned or row.new

    def run(self, layer: int, site: str, x_ND: Tensor, other_ND: Tensor | None) -> Tensor:
        """Steered ``x_ND`` at ``(layer, site)`` (``x_ND`` itself when no request is steered there; the op copies it
        into its output buffer); ``other_ND`` is the residual (resid sites) or mlp_in (mlp_out).

        vLLM carries the residual stream as ``hidden + residual``; ops see the sum and their change is added to
        ``hidden``, so untouched tokens stay bit-identical.
        """
        jobs, reads = self._sites.get((layer, site)), self._reads.get((layer, site))
        if not jobs and not reads:
            return x_ND
        summed = site in RESIDUAL_SITES and other_ND is not None
        base = x_ND + other_ND if summed and other_ND is not None else x_ND
        x_in = other_ND if site == "mlp_out" else None
        out = base
        for job in jobs or ():
            if job.idx_N is None:
                out = run_site(job.ops, out, job.tb, job.state, x_in)
            else:
                sub_in = None if x_in is None else x_in[job.idx_N]
                out = out.index_copy(0, job.idx_N, run_site(job.ops, out[job.idx_N], job.tb, job.state, sub_in))
        for read in reads or ():  # what the model reads on from here: after this site's steering
            capture.write(read.tag, layer, site, read.positions_N, out[read.start : read.end])
        if not jobs:
            return x_ND
        if summed:
            return x_ND + (out - base)
        return out

    # -- detector-gated refusal (from the tracker, after each forward) -------------------------------------------

    def refusing(self) -> bool:
        """True if some request in the batch has a ``refuse`` op."""
        return any(self.plans[row.key].refuses for row in self.rows.values())

    def forced_tokens(self) -> dict[int, int]:
        """Batch row -> the token it must emit this step: its refusal message, then end-of-turn.

        A ``refuse`` op's gate decides while the prompt is read; from the step that reads the prompt's last token on,
        a flagged request emits the first detector's message token by token (as ``steerlib.hf.refusal`` does on HF).
        A ``prefill``-mode detector's message gets no end-of-turn: after it, the row is left to the (steered) model.
        """
        out: dict[int, int] = {}
        for index, row in self.rows.items():
            if not self.plans[row.key].refuses:
                continue
            if row.forced is None:
                row.forced = self._refusal(row)
            token = None if row.forced is None else forced_token(row.forced, row.n_forced, row.prefill)
            if token is not None:
                out[index] = token
                row.n_forced += 1
        return out

    def _refusal(self, row: _Row) -> list[int] | None:
        """The row's message ids (+ end-of-turn unless in prefill mode) if a detector fired, [] if none did, None if
        not decided yet."""
        shared = self.plans[row.key]
        decided, refusal = row_refusal(shared.plan.detectors, shared.state, row.slot)
        if not decided:
            return None
        if refusal is None:
            return []
        tok = self._tokenizer()
        if tok is None:
            raise RuntimeError("steerlib: op refuse needs the model's tokenizer in the vLLM worker")
        row.prefill = refusal.mode == "prefill"
        verdicts.record(row.tag, refusal.detector)
        return refusal_ids(tok, refusal.message, refusal.mode)


_STATE: list[SteeringState] = []
"""The worker's state (one engine per worker process); a list so nothing is rebound at module level."""


def current() -> SteeringState | None:
    return _STATE[0] if _STATE else None


def install(state: SteeringState) -> SteeringState:
    """Make ``state`` the worker's (a later model build in the same process replaces it)."""
    _STATE[:] = [state]
    return state
