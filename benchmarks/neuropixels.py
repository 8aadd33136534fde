"""Neuropixels-specific preprocessing measured against ground truth: the ADC sample-shift correction.

Data: two seeded synthetic sessions written by ``nwbflow synth`` (``--num-channels`` channels, Neuropixels 1.0
ADC delays written as the electrodes' ``inter_sample_shift``, the same units, spikes and per-channel noise),
one with a common-mode signal (``--common-noise-uv`` µV RMS, 12 tones in 300-6000 Hz, each channel sampled
at its own ADC time) and one without. Each is preprocessed (``preprocess_to_binary``, defaults but no
whitening so the output stays in µV) with ``adc_phase_shift`` on and off.

Truth: the session without the common-mode signal, preprocessed the same way. ``residual µV`` is the RMS
over all samples and channels of (preprocessed with the signal) - (preprocessed without it): what the
common reference failed to cancel. ``x real time`` is the preprocessing's speed on the session with the signal.

    .venv/bin/python benchmarks/neuropixels.py --out benchmarks/results/neuropixels.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from nwbflow.ephys.preprocess import preprocess_to_binary
from nwbflow.nwb_io.read import open_session
from nwbflow.params import PreprocessParams
from nwbflow.report import format_table
from nwbflow.synth import SynthConfig, write_synthetic_session


def _preprocess(path: Path, out: Path, correct: bool) -> tuple[np.ndarray, float]:
    params = PreprocessParams(whiten=False, output_dtype="float32", adc_phase_shift=correct)
    with open_session(path) as session:
        series = session.select_ephys()
        clock = time.perf_counter()
        record = preprocess_to_binary(series, params, out)
        seconds = time.perf_counter() - clock
    return np.fromfile(out, dtype=np.float32).reshape(record.num_samples, record.num_channels), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-channels", type=int, default=384)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--common-noise-uv", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/neuropixels.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nwbflow-np-") as tmp:
        work = Path(tmp)
        base = dict(duration_s=args.duration_s, num_channels=args.num_channels, num_units=args.num_channels // 4,
                    ophys=False, adc_shifts=True)
        noisy, quiet = work / "common.nwb", work / "quiet.nwb"
        write_synthetic_session(noisy, SynthConfig(**base, common_noise_uv=args.common_noise_uv))
        write_synthetic_session(quiet, SynthConfig(**base))
        for correct in (True, False):
            with_signal, seconds = _preprocess(noisy, work / "a.bin", correct)
            truth, _ = _preprocess(quiet, work / "b.bin", correct)
            residual = float(np.sqrt(np.mean((with_signal.astype(np.float64) - truth) ** 2)))
            rows.append({"adc_phase_shift": correct, "residual_uv": round(residual, 3),
                         "x_realtime": round(args.duration_s / seconds, 2)})
            print(rows[-1], flush=True)
    print(format_table(["adc_phase_shift", "residual µV", "x real time"],
                       [[str(r["adc_phase_shift"]), r["residual_uv"], r["x_realtime"]] for r in rows], 100))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"session": {"num_channels": args.num_channels, "duration_s": args.duration_s,
                                                "common_noise_uv": args.common_noise_uv}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
