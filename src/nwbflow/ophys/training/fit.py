"""Fit the CNN on a bank of examples: Adam, cosine learning rate, MSE on smoothed spike counts."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.ophys.model import CnnSpec, SpikeCnn
from nwbflow.ophys.training.bank import SIMULATED, Bank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    """steps : optimizer steps; batch : examples per step; learning_rate : Adam's initial rate;
    simulated_share : fraction of each batch drawn from simulated examples (the rest from
    ground truth, datasets equally often)."""

    steps: int = 3000
    batch: int = 32
    learning_rate: float = 1e-3
    simulated_share: float = 0.3


def _sampler(bank: Bank, settings: FitSettings, rng: np.random.Generator):
    """Index batches: simulated examples with ``simulated_share``, else a dataset drawn uniformly."""
    simulated = np.flatnonzero(bank.source == SIMULATED)
    by_dataset = [np.flatnonzero(bank.source == s) for s in np.unique(bank.source) if s != SIMULATED]
    share = settings.simulated_share if simulated.size else 0.0
    if not by_dataset:
        share = 1.0

    def draw() -> np.ndarray:
        n_sim = int(rng.binomial(settings.batch, share))
        picks = [rng.choice(simulated, n_sim)] if n_sim else []
        if settings.batch - n_sim:
            which = rng.integers(len(by_dataset), size=settings.batch - n_sim)
            picks += [rng.choice(by_dataset[w], 1) for w in which]
        return np.concatenate(picks)

    return draw


def fit_cnn(bank: Bank, spec: CnnSpec, settings: FitSettings, seed: int) -> tuple[SpikeCnn, list[float]]:
    """Train a new network on ``bank`` (CPU, deterministic for a given seed and thread count).

    Returns the network (eval mode) and the loss of every 100th step.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SpikeCnn(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / settings.steps, 1.0))))
    draw = _sampler(bank, settings, rng)
    dff, target = torch.from_numpy(bank.dff), torch.from_numpy(bank.target)
    noise = torch.log(torch.from_numpy(bank.noise).clamp(0.05, 100.0))
    rate = torch.log(torch.from_numpy(bank.rate_hz) / spec.model_rate_hz)
    losses, running, clock = [], 0.0, time.perf_counter()
    model.train()
    for step in range(settings.steps):
        idx = torch.from_numpy(draw())
        x = torch.empty(len(idx), 3, dff.shape[1])
        x[:, 0] = dff[idx]
        x[:, 1] = noise[idx, None]
        x[:, 2] = rate[idx, None]
        loss = torch.mean((model(x) - target[idx]) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += float(loss.detach())
        if (step + 1) % 100 == 0:
            losses.append(running / 100)
            running = 0.0
            if (step + 1) % 500 == 0:
                log.info("step %d/%d loss %.5f (%.0f s)", step + 1, settings.steps, losses[-1],
                         time.perf_counter() - clock)
    return model.eval(), losses
