"""The mean of the APM's weights over the scored warm-up epochs (stochastic weight averaging).

At the warm-up's constant learning rate the APM's selection score swings from one epoch to the next; the
mean of the scored epochs' weights sits nearer the middle of the region they move around in. It is one more
candidate for the APM that goes on to the joint phase: scored on the selection images like an epoch and kept
only where it scores higher than the best epoch (``Trainer._restore_best_warmup``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch


class WeightAverage:
    """Running sum of state dicts; floating-point entries are averaged, the others kept from the last one."""

    def __init__(self, state: Optional[Dict[str, Any]] = None):
        state = state or {}
        self.total: Optional[Dict[str, torch.Tensor]] = state.get("total")
        self.count = int(state.get("count", 0))

    def add(self, weights: Dict[str, torch.Tensor]) -> None:
        weights = {k: v.detach().cpu() for k, v in weights.items()}
        if self.total is None:
            self.total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in weights.items()}
        else:
            for k, v in weights.items():
                self.total[k] = self.total[k] + v.double() if v.is_floating_point() else v.clone()
        self.count += 1

    def mean(self) -> Optional[Dict[str, torch.Tensor]]:
        """The mean weights in their own dtypes, or None before two states were added."""
        if self.total is None or self.count < 2:
            return None
        return {k: (v / self.count).float() if v.is_floating_point() else v.clone() for k, v in self.total.items()}

    def state(self) -> Dict[str, Any]:
        return {"total": self.total, "count": self.count}
