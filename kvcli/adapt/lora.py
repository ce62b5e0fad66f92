"""Low-rank adapters written by hand: ``y = W x + scale * B (A x)`` on chosen projections."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..engine.models.adapter import PROJECTIONS, projections


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank delta (``B`` starts at zero, so the
    wrapped layer computes exactly what the base did until training moves it)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.enabled = True
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, w.shape[1], dtype=torch.float32, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=torch.float32, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        delta = (x.float() @ self.lora_a.t()) @ self.lora_b.t()
        return out + (self.scale * delta).to(out.dtype)


class Lora:
    """LoRA on the q/k projections of ``layers``, installed in ``model`` (``remove`` undoes it)."""

    def __init__(self, model: Any, layers: list[int], rank: int, scale: float, seed: int = 0) -> None:
        self.model = model
        generator = torch.Generator().manual_seed(seed)  # the same start for the same seed (resumes compare)
        self.modules: dict[tuple[int, str], LoraLinear] = {}
        self._parents: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        names = {id(m): n for n, m in model.named_modules()}
        for key, base in sorted(projections(model, layers).items()):
            parent = model.get_submodule(names[id(base)].rsplit(".", 1)[0])
            wrapped = LoraLinear(base, rank, scale, generator)  # type: ignore[arg-type]
            setattr(parent, key[1], wrapped)
            self.modules[key] = wrapped
            self._parents[key] = (parent, key[1], base)

    def parameters(self) -> list[nn.Parameter]:
        return [p for key in sorted(self.modules) for p in (self.modules[key].lora_a, self.modules[key].lora_b)]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model (the teacher; training-free PoD) for the duration."""
        for m in self.modules.values():
            m.enabled = False
        try:
            yield
        finally:
            for m in self.modules.values():
                m.enabled = True

    def deltas(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        return {k: (m.lora_a.detach().clone(), m.lora_b.detach().clone()) for k, m in self.modules.items()}

    def load(self, deltas: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for key, (a, b) in deltas.items():
                self.modules[key].lora_a.copy_(a)
                self.modules[key].lora_b.copy_(b)

    def remove(self) -> None:
        for parent, name, base in self._parents.values():
            setattr(parent, name, base)


__all__ = ["PROJECTIONS", "Lora", "LoraLinear"]
