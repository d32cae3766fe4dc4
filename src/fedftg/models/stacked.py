"""Several models of one architecture as frozen teachers: stacked (fast) or reloaded (reference).

FedFTG and FedDF query the round's client models many times per server step. `StackedModels`
keeps the K models as one stacked copy of their parameters and buffers and evaluates all of
them in one batched call (`torch.func.functional_call` under `vmap`); a single model is a
view into the stack, so nothing is copied per query. `ReloadingModels` is the simple
reference with the authors' loop structure: one module whose weights are reloaded from the
client's state before every forward pass. Both are used in eval mode only and give the same
numbers (up to float summation order).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedftg.models.bn_stats import with_bn_gap


def meta_copy(model: nn.Module) -> nn.Module:
    """A weightless eval-mode copy of ``model`` to run `functional_call` on."""
    return copy.deepcopy(model).to("meta").eval()


class StackedModels:
    """K models held as one stacked copy ((K, ...) per parameter and buffer), eval mode."""

    def __init__(self, template: nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> None:
        if not states:
            raise ValueError("StackedModels needs at least one state")
        self._net = meta_copy(template)
        names = dict(template.named_parameters()).keys()
        self.params = {n: torch.stack([s[n].detach() for s in states]) for n in names}
        self.buffers = {
            n: torch.stack([s[n].detach() for s in states]) for n, _ in template.named_buffers()
        }

    @classmethod
    def from_modules(cls, models: Sequence[nn.Module]) -> StackedModels:
        return cls(models[0], [m.state_dict() for m in models])

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def state(self, j: int) -> dict[str, torch.Tensor]:
        """Model ``j``'s full state as views into the stack."""
        return {n: v[j] for n, v in {**self.params, **self.buffers}.items()}

    def one(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of model ``j`` on ``x`` (differentiable w.r.t. ``x``)."""
        return functional_call(self._net, self.state(j), (x,))

    def module(self, j: int) -> nn.Module:
        """Model ``j`` as an ordinary module (eval mode) holding a copy of its weights."""
        first = next(iter(self.params.values()))
        net = copy.deepcopy(self._net).to_empty(device=first.device)
        net.load_state_dict(self.state(j))
        return net.eval()

    def all(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every model on the same ``x``: (K, B, C), in one batched call.

        Under autocast it runs one model after another instead: PyTorch's vmap rule for a
        convolution with batched weights mixes bf16 inputs with an fp32 bias there.
        """
        if torch.is_autocast_enabled(x.device.type):
            return torch.stack([self.one(j, x) for j in range(len(self))])

        def run(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self._net, (p, b), (x,))

        return vmap(run)(self.params, self.buffers)

    def one_with_bn_gap(self, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`one` and model ``j``'s BatchNorm-statistics gap on ``x`` (`fedftg.models.bn_stats`),
        from the same forward pass."""
        return with_bn_gap(self._net, lambda: self.one(j, x))

    def all_with_bn_gap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`all` and each model's BatchNorm-statistics gap on ``x``, (K,), from the same
        batched pass (one model after another under autocast, as `all`)."""
        if torch.is_autocast_enabled(x.device.type):
            pairs = [self.one_with_bn_gap(j, x) for j in range(len(self))]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

        def run(
            p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return with_bn_gap(self._net, lambda: functional_call(self._net, (p, b), (x,)))

        return vmap(run)(self.params, self.buffers)


class ReloadingModels:
    """Reference path: one module, the client's weights loaded before every forward pass."""

    def __init__(self, template: nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> None:
        if not states:
            raise ValueError("ReloadingModels needs at least one state")
        self._net = copy.deepcopy(template).eval().requires_grad_(False)
        self._states = list(states)

    @classmethod
    def from_modules(cls, models: Sequence[nn.Module]) -> ReloadingModels:
        return cls(models[0], [m.state_dict() for m in models])

    def __len__(self) -> int:
        return len(self._states)

    def state(self, j: int) -> dict[str, torch.Tensor]:
        return self._states[j]

    def one(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Load client ``j``'s weights, then run; backpropagate before the next reload."""
        self._net.load_state_dict(self._states[j])
        return self._net(x)

    def all(self, x: torch.Tensor) -> torch.Tensor:
        """One model after another; each reads its own state, so all stay differentiable."""
        return torch.stack([functional_call(self._net, s, (x,)) for s in self._states])

    def one_with_bn_gap(self, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`one` and client ``j``'s BatchNorm-statistics gap on ``x``, from the same pass."""
        return with_bn_gap(self._net, lambda: self.one(j, x))

    def all_with_bn_gap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`all` and each model's BatchNorm-statistics gap on ``x``, (K,)."""
        pairs = [
            with_bn_gap(self._net, partial(functional_call, self._net, s, (x,)))
            for s in self._states
        ]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


Teachers = StackedModels | ReloadingModels


def as_teachers(teachers: Teachers | Sequence[nn.Module], impl: str = "fast") -> Teachers:
    """``teachers`` as the teacher set a server step's ``impl`` runs on.

    The engine holds the round's client models as it sees fit (stacked, usually); a step
    with impl="reference" runs the authors' loop structure on them (`ReloadingModels`, over
    the same states), impl="fast" the stacked calls.
    """
    if impl == "reference":
        if isinstance(teachers, ReloadingModels):
            return teachers
        if isinstance(teachers, StackedModels):
            return ReloadingModels(
                teachers.module(0), [teachers.state(j) for j in range(len(teachers))]
            )
        return ReloadingModels.from_modules(list(teachers))
    if isinstance(teachers, StackedModels):
        return teachers
    if isinstance(teachers, ReloadingModels):
        return StackedModels(teachers._net, [teachers.state(j) for j in range(len(teachers))])
    return StackedModels.from_modules(list(teachers))
