"""Record activations at any sites of an HF model, for the tokens a selector picks (:func:`record`).

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from steerlib import record
>>> _ = torch.manual_seed(0)  # a tiny random Llama: 2 layers, width 64
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
>>> ids = torch.tensor([[1, 5, 9, 2], [1, 7, 7, 3]])
>>> with torch.no_grad(), record(model, [(0, "resid_post")], select={"positions": [-1]}) as rec:
...     out = model(input_ids=ids, output_hidden_states=True)
>>> acts = rec["blocks.0.hook_resid_post"]  # (N, D): the last token of each row, after layer 0
>>> acts.shape, rec.rows.tolist(), rec.positions.tolist()
(torch.Size([2, 64]), [0, 1], [3, 3])
>>> torch.equal(acts, out.hidden_states[1][:, -1])
True

Recording hooks run after any steering hooks, so what is recorded is the steered stream the model really uses.
Each recorded token also carries its row, position and whether it was a prompt token (``rec.rows`` etc.), and
``on_step`` lets a caller stream activations away (SAE training) instead of keeping them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from steerlib.config import TokenSelector
from steerlib.hf.layout import get_layout
from steerlib.hf.targets import first_input, first_output, target
from steerlib.hf.tracker import StepState, stack_pre_hook
from steerlib.plan import Resources, TokenizerLike, resolve_selector, spec_of
from steerlib.sites import SITES, parse_site, tl_name

SiteRef = str | tuple[int, str]
StepCallback = Callable[[dict[str, Tensor], Tensor, Tensor], None]
"""Called once per step with ``{site: (n, D)}``, the selected tokens' rows ``(n,)`` and positions ``(n,)``."""


@dataclass
class Recording:
    """Activations per site (TransformerLens names), concatenated over the steps recorded."""

    sites: tuple[str, ...]
    keep: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the recorded tensors are kept (an empty recording is empty there too)."""
    _acts: dict[str, list[Tensor]] = field(default_factory=dict)
    _rows: list[Tensor] = field(default_factory=list)
    _positions: list[Tensor] = field(default_factory=list)
    _prompt: list[Tensor] = field(default_factory=list)
    _steps: list[Tensor] = field(default_factory=list)

    def __getitem__(self, site: SiteRef) -> Tensor:
        name = _site_name(site)
        if name not in self.sites:
            raise KeyError(f"site {name} was not recorded; recorded: {list(self.sites)}")
        return self._joined(self._acts.get(name, []))

    @property
    def rows(self) -> Tensor:
        """Batch row of each recorded token ``(N,)``."""
        return self._joined(self._rows, torch.long)

    @property
    def positions(self) -> Tensor:
        """Position of each recorded token in its row ``(N,)`` (0 = first non-padding token)."""
        return self._joined(self._positions, torch.long)

    @property
    def is_prompt(self) -> Tensor:
        return self._joined(self._prompt, torch.bool)

    @property
    def steps(self) -> Tensor:
        """Index of the forward step each token was recorded in ``(N,)``."""
        return self._joined(self._steps, torch.long)

    def _joined(self, chunks: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """The chunks recorded so far as one tensor; an empty one (``dtype``, default float) before the first."""
        return torch.cat(chunks) if chunks else torch.empty(0, dtype=dtype, device=self.device)

    def clear(self) -> None:
        for lst in (self._rows, self._positions, self._prompt, self._steps, *self._acts.values()):
            lst.clear()


def _site_name(site: SiteRef) -> str:
    if isinstance(site, tuple):
        layer, name = site
    else:
        parsed, name = parse_site(site)
        if parsed is None:
            raise ValueError(
                f"site {site!r}: give a TransformerLens name like blocks.3.hook_resid_post or (3, 'resid_post')"
            )
        layer = parsed
    if name not in SITES:
        raise ValueError(f"unknown site {name!r}; allowed: {', '.join(SITES)}")
    if layer < 0:
        raise ValueError(f"site {site!r}: layer must be >= 0, got {layer}")
    return tl_name(layer, name)


@contextmanager
def record(
    model: nn.Module,
    sites: Sequence[SiteRef],
    *,
    select: TokenSelector | dict[str, Any] | None = None,
    tokenizer: TokenizerLike | None = None,
    on_step: StepCallback | None = None,
    keep: bool = True,
    device: str | torch.device = "cpu",
) -> Iterator[Recording]:
    """Record ``sites`` while the block runs; ``select`` picks tokens (default: every non-padding token).

    ``sites`` are TransformerLens names or ``(layer, site)`` pairs; the recording holds ``(N, D)`` per site for the
    ``N`` tokens selected, with their rows and positions (the module's docstring has a runnable example).
    """
    layout = get_layout(model)
    names = tuple(dict.fromkeys(_site_name(s) for s in sites))
    sel = TokenSelector.model_validate(select or {}) if not isinstance(select, TokenSelector) else select
    spec = spec_of(model, layout.n_layers, layout.d_model)
    selector = resolve_selector(sel, Resources(spec), tokenizer, "select")
    rec = Recording(names, keep, torch.device(device))
    state = StepState()
    step_acts: dict[str, Tensor] = {}
    handles: list[RemovableHandle] = []

    def keep_acts(name: str, x_BTD: Tensor) -> None:
        tb = state.batch()
        m = selector.mask(tb)
        step_acts[name] = x_BTD.detach().reshape(-1, x_BTD.shape[-1])[m].to(device)
        if len(step_acts) == len(names):  # every site of this step is in: hand the step over
            rows, pos = tb.row_N[m].to(device), tb.position_N[m].to(device)
            if keep:
                for n in names:
                    rec._acts.setdefault(n, []).append(step_acts[n])
                rec._rows.append(rows)
                rec._positions.append(pos)
                rec._prompt.append(tb.is_prompt_N[m].to(device))
                rec._steps.append(torch.full_like(rows, len(rec._steps)))
            if on_step is not None:
                on_step(dict(step_acts), rows, pos)
            step_acts.clear()

    try:
        handles.append(layout.base.register_forward_pre_hook(stack_pre_hook(layout.base, state), with_kwargs=True))
        for name in names:
            layer, site = parse_site(name)
            assert layer is not None
            if layer >= layout.n_layers:
                raise ValueError(f"site {name}: layer {layer} out of range: model has {layout.n_layers} layers")
            t = target(layout, layer, site)
            if t.kind == "input":
                handles.append(t.module.register_forward_pre_hook(_pre(name, keep_acts), with_kwargs=True))
            else:
                handles.append(t.module.register_forward_hook(_post(name, keep_acts)))
        yield rec
    finally:
        for h in handles:
            h.remove()


def _pre(name: str, sink: Callable[[str, Tensor], None]) -> Callable[..., None]:
    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sink(name, first_input(args, kwargs))

    return hook


def _post(name: str, sink: Callable[[str, Tensor], None]) -> Callable[..., None]:
    def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        sink(name, first_output(output))

    return hook
