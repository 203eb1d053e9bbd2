"""Loss-spike guard: a finite loss far above its running statistics (long DiT-scale runs diverge
through such spikes well before a NaN).

The guard keeps an exponential moving mean and variance of the step loss (decay
``train.spike_decay``). After ``train.spike_warmup`` steps, a loss above both
``mean + spike_zscore * std`` and ``spike_min_ratio * mean`` is a spike; spikes do not enter the
statistics. ``train.spike_action`` then says what the loop does: ``log`` (warn, save the batch,
train on it), ``skip`` (also leave the parameters untouched) or ``rollback`` (also return to the
newest training state and go on with the batch after the spike: the steps that led to it are
undone, and the run equals one that skipped them: the data order and the RNG go on, for both latent
loaders; docs/fault-tolerance.md). ``train.spike_zscore=0`` turns the guard off. Its state is saved with each checkpoint, so a
resumed run judges the same steps the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SpikeGuard:
    zscore: float           # 0 = off
    min_ratio: float
    warmup: int
    decay: float
    mean: float = 0.0
    var: float = 0.0
    seen: int = 0

    def is_spike(self, loss: float) -> bool:
        """Judge a finite step loss, then (unless it is a spike) add it to the statistics."""
        if self.zscore <= 0:
            return False
        spike = (self.seen >= self.warmup and loss > self.mean + self.zscore * math.sqrt(self.var)
                 and loss > self.min_ratio * self.mean)
        if not spike:
            self._add(loss)
        return spike

    def _add(self, loss: float) -> None:
        if self.seen == 0:
            self.mean = loss
        else:  # exponentially weighted mean and variance
            alpha = 1.0 - self.decay
            delta = loss - self.mean
            self.mean += alpha * delta
            self.var = (1.0 - alpha) * (self.var + alpha * delta * delta)
        self.seen += 1

    def describe(self, loss: float) -> str:
        return (f"loss {loss:.4g} is a spike: {(loss - self.mean) / max(math.sqrt(self.var), 1e-12):.1f} standard "
                f"deviations above its running mean {self.mean:.4g}")

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "seen": self.seen}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.seen = float(state["mean"]), float(state["var"]), int(state["seen"])

    @classmethod
    def from_config(cls, train_cfg) -> "SpikeGuard":
        """The guard of a ``TrainConfig``'s ``spike_*`` settings."""
        return cls(train_cfg.spike_zscore, train_cfg.spike_min_ratio, train_cfg.spike_warmup, train_cfg.spike_decay)

