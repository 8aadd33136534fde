"""``nwbflow train-calcium``: train the shipped network from simulation + public ground truth, reproducibly.

Writes ``<name>.pt`` and ``<name>.json`` (the model card: architecture,
weights SHA-256, training command, seed, torch version, settings, and for
every ground-truth dataset its repository, commit, path, neuron count and a
SHA-256 of its files). Deterministic for a given seed on a given machine
and thread count.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from nwbflow.ophys.model import CnnSpec, parameter_count
from nwbflow.ophys.training.alignment import align_lags, onset_lag_s
from nwbflow.ophys.training.bank import Bank, ground_truth_bank, simulated_bank
from nwbflow.ophys.training.fit import FitSettings, fit_cnn
from nwbflow.ophys.training.groundtruth import EXCLUDED, GtDataset, load_all
from nwbflow.ophys.weights import DEFAULT_MODEL, save_cnn

log = logging.getLogger(__name__)

EXAMPLES_PER_DATASET = 2000
SIMULATED_EXAMPLES = 8000
THREADS = 2


def build_bank(datasets: list[GtDataset], spec: CnnSpec, seed: int,
               examples_per_dataset: int = EXAMPLES_PER_DATASET,
               simulated_examples: int = SIMULATED_EXAMPLES) -> tuple[Bank, dict]:
    """Examples of every dataset (source = its index in ``datasets``) and of the simulator.

    The datasets' spike-to-fluorescence lags are measured and aligned to one lag first
    (:mod:`.alignment`). Returns the bank and, per dataset name, its lag and the shift applied (s).
    """
    lags = [onset_lag_s(d) for d in datasets]
    aligned, shifts = align_lags(datasets, lags)
    rng = np.random.default_rng(seed)
    parts = [ground_truth_bank(d, i, spec, rng, examples_per_dataset) for i, d in enumerate(aligned)]
    if simulated_examples:
        parts.append(simulated_bank(spec, rng, simulated_examples))
    alignment = {d.name: {"lag_s": lag, "shift_s": shifts[d.name]} for d, lag in zip(datasets, lags)}
    return Bank.concatenate(parts), alignment


def train(data_dir: str | Path, out_dir: str | Path, name: str = DEFAULT_MODEL, *, seed: int = 0,
          steps: int = 16000, command: str = "") -> dict:
    """Train on every usable dataset under ``data_dir`` plus simulation; write weights + card; return the card."""
    torch.set_num_threads(THREADS)
    clock = time.perf_counter()
    spec = CnnSpec()
    datasets = load_all(data_dir)
    bank, alignment = build_bank(datasets, spec, seed)
    settings = FitSettings(steps=steps)
    model, losses = fit_cnn(bank, spec, settings, seed)
    card = {
        "description": "nwbflow calcium spike inference CNN: ΔF/F (any rate 7-100 Hz, resampled to "
                       f"{spec.model_rate_hz:g} Hz) -> spikes per sample; noise level and recorded rate as inputs.",
        "training_command": command,
        "seed": seed, "torch_version": torch.__version__, "numpy_version": np.__version__,
        "python": platform.python_version(), "threads": THREADS,
        "settings": {"steps": settings.steps, "batch": settings.batch, "learning_rate": settings.learning_rate,
                     "simulated_share": settings.simulated_share, "examples_per_dataset": EXAMPLES_PER_DATASET,
                     "simulated_examples": SIMULATED_EXAMPLES},
        "datasets": [d.provenance() for d in datasets],
        "spike_lag_alignment": alignment,
        "excluded_datasets": EXCLUDED,
        "simulator": "nwbflow.ophys.training.simulate (families: OGB, GCaMP6f, GCaMP6s, GCaMP7f, GCaMP8)",
        "parameters": parameter_count(model),
        "final_loss": losses[-1] if losses else None,
        "training_seconds": round(time.perf_counter() - clock, 1),
    }
    return save_cnn(model, out_dir, name, card)


def main(argv: list[str] | None = None) -> int:
    from nwbflow.ophys.training.cli import add_arguments, run

    parser = argparse.ArgumentParser(prog="train_calcium", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    card = run(parser.parse_args(argv))
    print(f"wrote {card['name']} ({card['weights_bytes']} bytes, sha256 {card['weights_sha256']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
