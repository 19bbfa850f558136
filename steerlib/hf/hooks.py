"""Install a steering plan on a HuggingFace model as forward hooks: ``attach`` returns a handle, ``steer`` is a context.

One pre-hook on the model's decoder stack records what each token of the step is (row, position with left padding,
prompt or generated: see ``steerlib.tokens``); the site hooks then run the plan's ops on those tokens. All hooks are
installed or none: a config error is raised by ``build_plan`` before anything is registered, and a failure while
registering removes what was already registered.

Steering hooks are placed ahead of every other hook on a module (transformers records ``output_hidden_states`` with
its own forward hooks, and activation recording uses hooks too), so what is recorded is the steered stream that the
next layer really receives. Several handles on one model keep their attach order among themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from steerlib.config import SteeringConfig
from steerlib.hf.layout import ModelLayout, get_layout
from steerlib.hf.targets import (
    first_input,
    first_output,
    replace_first_input,
    replace_first_output,
    target,
)
from steerlib.hf.tracker import StepState, stack_pre_hook
from steerlib.plan import BoundOp, Plan, Resources, TokenizerLike, build_plan, spec_of
from steerlib.run_state import RunState
from steerlib.runner import run_site

_MARK = "_steerlib_hook"


@dataclass
class SteeringHandle:
    """Installed steering; ``remove()`` takes every hook out (idempotent). Also a context manager.

    ``plan`` is what the config means (immutable); ``state`` is what happened while it ran on this model (the
    prompt verdicts of its gates and detectors, see :func:`steerlib.hf.refusal.refusals`)."""

    plan: Plan
    state: RunState
    _hooks: list[RemovableHandle] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(
    model: nn.Module,
    config: SteeringConfig | Sequence[SteeringConfig | None],
    *,
    tokenizer: TokenizerLike | None = None,
    resources: Resources | None = None,
) -> SteeringHandle:
    """Install ``config`` on ``model`` (one config for every row, or one per row, None = unsteered row).

    ``resources`` (a :class:`~steerlib.plan.Resources` for this model) reuses vectors and SAEs already loaded.
    The steering stays until the returned handle's ``remove()`` (or the end of its ``with`` block):

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from steerlib import SteeringConfig, attach, hooks_installed
    >>> _ = torch.manual_seed(0)  # a tiny random Llama: 2 layers, width 64
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    >>> ids = torch.tensor([[1, 5, 9, 2]])
    >>> plain = model(input_ids=ids).logits
    >>> handle = attach(model, SteeringConfig.from_dict({"interventions": [{"op": "ablate", "layer": 1,
    ...                                                                     "vector": [1.0] + [0.0] * 63}]}))
    >>> handle.active, hooks_installed(model) > 0, torch.equal(model(input_ids=ids).logits, plain)
    (True, True, False)
    >>> handle.remove()
    >>> hooks_installed(model), torch.equal(model(input_ids=ids).logits, plain)
    (0, True)
    """
    layout = get_layout(model)
    plan = build_plan(config, spec_of(model, layout.n_layers, layout.d_model), tokenizer, resources)
    handle = SteeringHandle(plan, plan.new_state())
    step = StepState()
    try:
        handle._hooks.append(_register_pre(layout.base, stack_pre_hook(layout.base, step)))
        for layer, site in plan.sites:  # sorted: resid_post(L-1) hooks before resid_pre(L)
            ops = plan.ops[(layer, site)]
            handle._hooks.append(_install_site(layout, layer, site, ops, step, handle.state))
    except BaseException:
        handle.remove()
        raise
    return handle


@contextmanager
def steer(
    model: nn.Module,
    config: SteeringConfig | Sequence[SteeringConfig | None],
    *,
    tokenizer: TokenizerLike | None = None,
    resources: Resources | None = None,
) -> Iterator[SteeringHandle]:
    """``with steer(model, cfg): model.generate(...)``; the hooks are gone after the block, exception or not.

    An ``add`` of a vector after layer 0 is exactly the unsteered residual stream plus the vector:

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from steerlib import SteeringConfig, steer
    >>> _ = torch.manual_seed(0)  # a tiny random Llama: 2 layers, width 64
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    >>> cfg = SteeringConfig.from_dict({"interventions": [{"op": "add", "layer": 0, "vector": [0.5] * 64}]})
    >>> ids = torch.tensor([[1, 5, 9, 2]])
    >>> with torch.no_grad(), steer(model, cfg):
    ...     steered = model(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after layer 0
    >>> with torch.no_grad():
    ...     plain = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    >>> torch.equal(steered, plain + 0.5)
    True
    """
    handle = attach(model, config, tokenizer=tokenizer, resources=resources)
    try:
        yield handle
    finally:
        handle.remove()


# -- site hooks -------------------------------------------------------------------------------------------------


def _run(
    ops: Sequence[BoundOp], x_BTD: Tensor, step: StepState, state: RunState, x_in_BTD: Tensor | None = None
) -> Tensor:
    tb = step.batch()
    B, T, D = x_BTD.shape
    if tb.row_N.shape[0] != B * T:
        raise RuntimeError(f"steering: activation has {B}x{T} tokens but the step has {tb.row_N.shape[0]}")
    x_in = None if x_in_BTD is None else x_in_BTD.reshape(B * T, -1)
    return run_site(ops, x_BTD.reshape(B * T, D), tb, state, x_in).reshape(B, T, D)


def _install_site(
    layout: ModelLayout, layer: int, site: str, ops: Sequence[BoundOp], step: StepState, state: RunState
) -> RemovableHandle:
    t = target(layout, layer, site)
    if t.kind == "input":

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            return replace_first_input(args, kwargs, _run(ops, first_input(args, kwargs), step, state))

        return _register_pre(t.module, pre)

    def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        # mlp_out ops may be transcoders: they read the MLP's input too.
        x_in = first_input(args, kwargs) if site == "mlp_out" else None
        return replace_first_output(output, _run(ops, first_output(output), step, state, x_in))

    return _register_post(t.module, post)


def _register_pre(module: nn.Module, fn: Callable[..., Any]) -> RemovableHandle:
    setattr(fn, _MARK, True)
    h = module.register_forward_pre_hook(fn, prepend=True, with_kwargs=True)
    _order(module._forward_pre_hooks)
    return h


def _register_post(module: nn.Module, fn: Callable[..., Any]) -> RemovableHandle:
    setattr(fn, _MARK, True)
    h = module.register_forward_hook(fn, prepend=True, with_kwargs=True)
    _order(module._forward_hooks)
    return h


def _order(hooks: Any) -> None:
    """Steering hooks first, in registration order (hook ids grow monotonically), then everyone else's."""
    ours = sorted(k for k, fn in hooks.items() if getattr(fn, _MARK, False))
    for k in reversed(ours):
        hooks.move_to_end(k, last=False)


def hooks_installed(model: nn.Module) -> int:
    """Number of steering hooks currently on ``model`` (0 after every handle is removed)."""
    n = 0
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            n += sum(1 for fn in hooks.values() if getattr(fn, _MARK, False))
    return n


__all__ = ["SteeringHandle", "attach", "hooks_installed", "steer"]
