"""Calcium spike inference accuracy, leave one dataset out, and CPU throughput.

For every ground-truth dataset k (CASCADE format, GT_autocalibration of
PTRRupprecht/Autocalibrated-spike-inference; DS09/DS14 left out as Spikefinder
sources), three methods are scored on dataset k as recorded (native frame
rate and noise), each fitted or tuned on the *other* datasets only:

- ours (CNN): trained as the shipped network is (same bank construction,
  spike-lag alignment and settings), on the other datasets + simulation;
- AR(1): non-negative AR(1) deconvolution (nwbflow.ophys.ar1), sparsity chosen
  on the other datasets from a grid, spikes-per-ΔF/F calibrated on them;
- first difference: positive part of the derivative of Gaussian-smoothed
  ΔF/F, smoothing chosen and scale calibrated on the other datasets.

Metric per neuron: Pearson correlation of predicted and true spike counts in
40 ms bins; CASCADE-style error and bias (nwbflow.ophys.metrics). Mean over
neurons per dataset, then per indicator family (mean over its datasets'
neurons). Prints a table and writes benchmarks/results/calcium.json.

Run (about 50 min on 2 cores at the shipped 16000 steps):
    flock /tmp/nwbflow-cpu.lock .venv/bin/python benchmarks/calcium.py --data-dir /work/data/calcium_gt
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from nwbflow.ophys.ar1 import ar1_spike_rate
from nwbflow.ophys.infer import infer_spike_rate
from nwbflow.ophys.metrics import score, score_neuron
from nwbflow.ophys.model import CnnSpec, macs_per_sample
from nwbflow.ophys.training.command import EXAMPLES_PER_DATASET, SIMULATED_EXAMPLES, THREADS, build_bank
from nwbflow.ophys.training.fit import FitSettings, fit_cnn
from nwbflow.ophys.training.groundtruth import GtDataset, load_all
from nwbflow.ophys.weights import load_cnn

RESULTS = Path(__file__).parent / "results" / "calcium.json"
SPARSITY_GRID = (0.0, 0.5, 1.0, 2.0, 4.0)
SMOOTHING_GRID_S = (0.02, 0.05, 0.1, 0.2)


def first_difference_rate(dff: np.ndarray, rate_hz: float, sigma_s: float) -> np.ndarray:
    """Positive part of the time derivative of Gaussian-smoothed ΔF/F (ΔF/F per s)."""
    smooth = gaussian_filter1d(dff.astype(np.float64), sigma_s * rate_hz, axis=0)
    return np.clip(np.gradient(smooth, axis=0) * rate_hz, 0.0, None)


def neuron_bins(dataset: GtDataset, predict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per neuron, (predicted, true) 40 ms counts over all its recordings; ``predict(dff (n,1), rate) -> (n,1)``."""
    out = []
    for neuron in dataset.neurons:
        parts = [score_neuron(predict(r.dff[:, None], r.rate_hz)[:, 0], r.times_s, r.spike_times_s)
                 for r in neuron]
        out.append((np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts])))
    return out


def summarize(bins: list[tuple[np.ndarray, np.ndarray]], scale: float = 1.0) -> dict:
    scores = [score(p * scale, t) for p, t in bins]
    corr = [s.correlation for s in scores if np.isfinite(s.correlation)]
    return {"correlation": float(np.mean(corr)), "error": float(np.nanmean([s.error for s in scores])),
            "bias": float(np.nanmean([s.bias for s in scores])), "neurons": len(corr),
            "per_neuron_correlation": [round(c, 4) for c in corr]}


def tuned_baseline(grid, bins_by_setting: dict, k: int, num: int) -> tuple[dict, float, float]:
    """Pick the grid value with the best mean correlation over datasets != k; calibrate scale on them."""
    def mean_corr(setting, datasets):
        return np.mean([summarize(bins_by_setting[setting][d])["correlation"] for d in datasets])
    others = [d for d in range(num) if d != k]
    best = max(grid, key=lambda s: mean_corr(s, others))
    predicted = sum(p.sum() for d in others for p, _ in bins_by_setting[best][d])
    true = sum(t.sum() for d in others for _, t in bins_by_setting[best][d])
    scale = float(true / predicted) if predicted > 0 else 1.0
    return summarize(bins_by_setting[best][k], scale), best, scale


def throughput(num_rois: int = 200, minutes: float = 10.0, rate_hz: float = 30.0) -> dict:
    """ROI-hours processed per second on this CPU by the shipped CNN and by AR(1)."""
    rng = np.random.default_rng(0)
    frames = int(minutes * 60 * rate_hz)
    dff = (0.02 * rng.standard_normal((frames, num_rois))).astype(np.float32)
    dff += np.abs(rng.standard_normal((frames, num_rois))).astype(np.float32) * (rng.random((frames, num_rois)) < 0.01)
    loaded = load_cnn()
    roi_hours = num_rois * minutes / 60.0
    clock = time.perf_counter()
    infer_spike_rate(dff, rate_hz, loaded.model, batch_size=64)
    cnn_s = time.perf_counter() - clock
    clock = time.perf_counter()
    ar1_spike_rate(dff[:, :50], rate_hz, sparsity=1.0, dff_per_spike=0.1)
    ar1_s = (time.perf_counter() - clock) * num_rois / 50
    return {"rois": num_rois, "minutes": minutes, "rate_hz": rate_hz, "threads": torch.get_num_threads(),
            "cnn_seconds": round(cnn_s, 2), "cnn_roi_hours_per_s": round(roi_hours / cnn_s, 3),
            "ar1_seconds": round(ar1_s, 2), "ar1_roi_hours_per_s": round(roi_hours / ar1_s, 3),
            "cnn_macs_per_model_sample": macs_per_sample(CnnSpec()),
            "extrapolated_1000_rois_1h_cnn_s": round(1000 * cnn_s / roi_hours, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--steps", type=int, default=16000,
                        help="training steps of each left-out model (default: the shipped network's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="dataset name prefixes to evaluate (default all)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(THREADS)
    clock = time.perf_counter()
    datasets = load_all(args.data_dir)
    spec = CnnSpec()
    ar1_bins = {s: [neuron_bins(d, lambda x, r, s=s: ar1_spike_rate(x, r, sparsity=s, dff_per_spike=1.0))
                    for d in datasets] for s in SPARSITY_GRID}
    diff_bins = {s: [neuron_bins(d, lambda x, r, s=s: first_difference_rate(x, r, s)) for d in datasets]
                 for s in SMOOTHING_GRID_S}
    rows = []
    for k, dataset in enumerate(datasets):
        if args.only and not any(dataset.name.startswith(p) for p in args.only):
            continue
        fold_clock = time.perf_counter()
        others = [d for i, d in enumerate(datasets) if i != k]
        bank, alignment = build_bank(others, spec, args.seed)
        model, _ = fit_cnn(bank, spec, FitSettings(steps=args.steps), args.seed)
        ours = summarize(neuron_bins(dataset, lambda x, r: infer_spike_rate(x, r, model, batch_size=64)))
        ar1, sparsity, ar1_scale = tuned_baseline(SPARSITY_GRID, ar1_bins, k, len(datasets))
        diff, sigma, diff_scale = tuned_baseline(SMOOTHING_GRID_S, diff_bins, k, len(datasets))
        rows.append({"dataset": dataset.name, "family": dataset.family, "rate_hz": round(dataset.rate_hz, 1),
                     "neurons": len(dataset.neurons), "ours": ours, "ar1": ar1, "first_difference": diff,
                     "ar1_sparsity": sparsity, "ar1_dff_per_spike": 1.0 / ar1_scale,
                     "diff_sigma_s": sigma, "training_lag_alignment": alignment,
                     "seconds": round(time.perf_counter() - fold_clock, 1)})
        logging.info("%s: ours %.3f ar1 %.3f diff %.3f", dataset.name, ours["correlation"], ar1["correlation"],
                     diff["correlation"])
    all_tuned = {"ar1": tuned_baseline(SPARSITY_GRID, ar1_bins, -1, len(datasets))[1:],
                 "first_difference": tuned_baseline(SMOOTHING_GRID_S, diff_bins, -1, len(datasets))[1:]}
    families = _families(rows)
    result = {"rows": rows, "families": families, "tuned_on_all": all_tuned,
              "mean_lodo_correlation": {m: float(np.mean([r[m]["correlation"] for r in rows]))
                                        for m in ("ours", "ar1", "first_difference")},
              "throughput": throughput(), "lodo_steps": args.steps, "seed": args.seed,
              "examples_per_dataset": EXAMPLES_PER_DATASET, "simulated_examples": SIMULATED_EXAMPLES,
              "datasets": [d.provenance() for d in datasets], "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "seconds": round(time.perf_counter() - clock)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(_table(rows, families, result))
    return 0


def _families(rows: list[dict]) -> dict:
    out = {}
    for family in sorted({r["family"] for r in rows}):
        members = [r for r in rows if r["family"] == family]
        out[family] = {m: float(np.mean([c for r in members for c in r[m]["per_neuron_correlation"]]))
                       for m in ("ours", "ar1", "first_difference")}
        out[family]["datasets"] = len(members)
    return out


def _table(rows: list[dict], families: dict, result: dict) -> str:
    lines = [f"{'dataset':40s} {'Hz':>6s} {'n':>3s} | {'ours':>5s} {'AR(1)':>5s} {'diff':>5s} | "
             f"{'err ours':>8s} {'bias ours':>9s} | {'err AR1':>7s} {'bias AR1':>8s}"]
    for r in rows:
        lines.append(f"{r['dataset']:40s} {r['rate_hz']:6.1f} {r['neurons']:3d} | {r['ours']['correlation']:5.3f} "
                     f"{r['ar1']['correlation']:5.3f} {r['first_difference']['correlation']:5.3f} | "
                     f"{r['ours']['error']:8.2f} {r['ours']['bias']:9.2f} | {r['ar1']['error']:7.2f} "
                     f"{r['ar1']['bias']:8.2f}")
    lines.append("family (mean over neurons)")
    for family, f in families.items():
        lines.append(f"{family:40s} {'':6s} {f['datasets']:3d} | {f['ours']:5.3f} {f['ar1']:5.3f} "
                     f"{f['first_difference']:5.3f}")
    m = result["mean_lodo_correlation"]
    lines.append(f"{'mean over datasets':40s} {'':6s} {'':3s} | {m['ours']:5.3f} {m['ar1']:5.3f} "
                 f"{m['first_difference']:5.3f}")
    lines.append(f"throughput: {result['throughput']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
