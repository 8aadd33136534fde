"""Neuropixels-specific preprocessing measured against ground truth: ADC sample shifts, bad channels.

Data: two seeded synthetic sessions written by ``nwbflow synth`` (``--num-channels`` channels, Neuropixels 1.0
ADC delays written as the electrodes' ``inter_sample_shift``, the same units, spikes and per-channel noise),
one with a common-mode signal (``--common-noise-uv`` µV RMS, 12 tones in 300-6000 Hz, each channel sampled
at its own ADC time) and one without. Each is preprocessed (``preprocess_to_binary``, defaults but no
whitening so the output stays in µV) with ``adc_phase_shift`` on and off.

Truth: the session without the common-mode signal, preprocessed the same way. ``residual µV`` is the RMS
over all samples and channels of (preprocessed with the signal) - (preprocessed without it): what the
common reference failed to cancel. ``x real time`` is the preprocessing's speed on the session with the signal.

Bad channels: a third seeded session (same probe and units, the shared background of ``--common-noise-uv``
on the channels in the brain) with ``--dead`` dead channels, ``--noisy`` noisy ones (4x the noise) and the
top ``--outside`` contacts outside the brain (``nwbflow synth --dead-channels/--noisy-channels/
--outside-channels``). Ours (``detect_bad_channels``, defaults) and SpikeInterface's
``detect_bad_channels(method="coherence+psd")`` label it; each label is scored against the truth
(channels found / missed / wrongly labelled) with its wall time.

Saturation: two more seeded sessions, the same units and noise, one with ``--saturation-events`` artifacts
(2-20 ms each, every channel driven past the ±1.2 mV rails and clipped: ``nwbflow synth
--saturation-events``) and one without. Each is preprocessed with defaults (whitened); with the saturation
rule off and with ``pad_ms`` from 0 to 4 ms. ``events found`` / ``false periods``: truth artifacts touched
by a zeroed period / zeroed periods touching none. Peaks (``detect_peaks``, defaults, noise levels of the clean
session) within 20 ms of an artifact are matched to the clean session's (same channel, ±0.3 ms):
``artifact peaks`` are those with no match (what the artifact added), ``spikes lost`` the clean session's with
none (what the zeroing removed), ``zeroed ms`` the time zeroed. SpikeInterface's ``detect_saturation_periods``
(same level, jump and proportion) runs on the raw session for the event count.

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


def _bad_channel_rows(path: Path, truth: dict[str, list[int]]) -> list[dict]:
    import spikeinterface.preprocessing as spre

    from nwbflow.ephys.preprocess import detect_bad_channels
    from nwbflow.nwb_io.si_recording import NwbSeriesRecording
    from nwbflow.params import BadChannelParams

    with open_session(path) as session:
        series = session.select_ephys()
        clock = time.perf_counter()
        ours = detect_bad_channels(series, BadChannelParams(), series.channel_positions_um, seed=0).by_label()
        ours_s = time.perf_counter() - clock
    recording = NwbSeriesRecording(path, "acquisition/ElectricalSeries")
    clock = time.perf_counter()
    _, labels = spre.detect_bad_channels(recording, method="coherence+psd", seed=0)
    theirs_s = time.perf_counter() - clock
    recording.close()
    names = {"dead": "dead", "noise": "noisy", "out": "outside"}
    theirs = {name: [int(c) for c in np.flatnonzero(labels == si)] for si, name in names.items()}
    rows = []
    for method, found, seconds in (("ours", ours, ours_s), ("spikeinterface", theirs, theirs_s)):
        for label, channels in truth.items():
            hit = set(found.get(label, [])) & set(channels)
            rows.append({"method": method, "label": label, "truth": len(channels), "found": len(hit),
                         "wrong": len(set(found.get(label, [])) - set(channels)), "seconds": round(seconds, 2)})
    return rows


def _zeroed(path: Path, out: Path, **saturation) -> tuple[np.ndarray, np.ndarray, float]:
    """Whitened preprocessed traces (float32), the periods zeroed, and the seconds taken."""
    from nwbflow.params import SaturationParams

    params = PreprocessParams(output_dtype="float32", saturation=SaturationParams(**saturation))
    with open_session(path) as session:
        series = session.select_ephys()
        clock = time.perf_counter()
        record = preprocess_to_binary(series, params, out)
        seconds = time.perf_counter() - clock
    traces = np.fromfile(out, dtype=np.float32).reshape(record.num_samples, record.num_channels)
    return traces, np.asarray(record.saturated_periods, np.int64).reshape(-1, 2), seconds


def _near(peaks: dict, truth: np.ndarray, reach: int) -> dict:
    keep = np.zeros(len(peaks["sample_index"]), bool)
    for start, end in truth:
        keep |= (peaks["sample_index"] >= start - reach) & (peaks["sample_index"] < end + reach)
    return {k: v[keep] for k, v in peaks.items()}


def _unmatched(a: dict, b: dict, tolerance: int) -> int:
    """Peaks of ``a`` with no peak of ``b`` on the same channel within ``tolerance`` samples."""
    missing = 0
    for sample, channel in zip(a["sample_index"], a["channel_index"]):
        same = b["sample_index"][b["channel_index"] == channel]
        missing += not np.any(np.abs(same - sample) <= tolerance)
    return missing


def _touching(periods: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each period, whether it overlaps any of ``others`` (both (k, 2) [start, end))."""
    return np.array([bool(np.any((others[:, 0] < end) & (others[:, 1] > start))) for start, end in periods], bool)


def _saturation_rows(work: Path, base: dict, events: int) -> list[dict]:
    import spikeinterface.preprocessing as spre

    from nwbflow.ephys.noise import MAD_TO_SD
    from nwbflow.ephys.peaks import detect_peaks
    from nwbflow.nwb_io.si_recording import NwbSeriesRecording
    from nwbflow.params import PeakParams, SaturationParams
    from nwbflow.synth.ephys import saturation_periods

    config = SynthConfig(**base, saturation_events=events)
    clean, hit = work / "clean.nwb", work / "saturated.nwb"
    write_synthetic_session(clean, SynthConfig(**base))
    write_synthetic_session(hit, config)
    truth = saturation_periods(config)
    rate = config.sampling_rate_hz
    with open_session(clean) as session:
        positions = session.select_ephys().channel_positions_um
    reference, _, _ = _zeroed(clean, work / "c.bin", detect=False)
    noise = np.median(np.abs(reference), axis=0) / MAD_TO_SD
    peaks = {"clean": _near(detect_peaks(reference, positions, rate, PeakParams(), noise), truth, int(0.02 * rate))}
    del reference
    rules = [("off", {"detect": False})] + [(f"pad {pad:g} ms", {"pad_ms": pad}) for pad in (0.0, 0.5, 1.0, 2.0, 4.0)]
    rows = []
    for name, rule in rules:
        traces, zeroed, seconds = _zeroed(hit, work / "s.bin", **rule)
        found = _near(detect_peaks(traces, positions, rate, PeakParams(), noise), truth, int(0.02 * rate))
        del traces
        rows.append({"rule": name, "events": len(truth), "events_found": int(_touching(truth, zeroed).sum())
                     if len(zeroed) else 0, "false_periods": int((~_touching(zeroed, truth)).sum()),
                     "zeroed_ms": round(float(np.sum(zeroed[:, 1] - zeroed[:, 0])) / rate * 1000, 1),
                     "artifact_peaks": _unmatched(found, peaks["clean"], int(0.0003 * rate)),
                     "spikes_lost": _unmatched(peaks["clean"], found, int(0.0003 * rate)),
                     "clean_peaks_near": len(peaks["clean"]["sample_index"]),
                     "x_realtime": round(config.duration_s / seconds, 2)})
        print(rows[-1], flush=True)
    defaults = SaturationParams()
    recording = NwbSeriesRecording(hit, "acquisition/ElectricalSeries")
    clock = time.perf_counter()
    theirs = spre.detect_saturation_periods(recording, saturation_threshold_uV=defaults.level_uv,
                                            diff_threshold_uV=defaults.jump_uv_per_ms * 1000 / rate,
                                            proportion=defaults.proportion)
    theirs_s = time.perf_counter() - clock
    recording.close()
    periods = np.stack([theirs["start_sample_index"], theirs["end_sample_index"]], axis=1).astype(np.int64)
    rows.append({"rule": "spikeinterface detect_saturation_periods", "events": len(truth),
                 "events_found": int(_touching(truth, periods).sum()) if len(periods) else 0,
                 "false_periods": int((~_touching(periods, truth)).sum()),
                 "zeroed_ms": round(float(np.sum(periods[:, 1] - periods[:, 0])) / rate * 1000, 1),
                 "artifact_peaks": None, "spikes_lost": None, "clean_peaks_near": None,
                 "x_realtime": round(config.duration_s / theirs_s, 2)})
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-channels", type=int, default=384)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--common-noise-uv", type=float, default=20.0)
    parser.add_argument("--dead", type=int, default=3)
    parser.add_argument("--noisy", type=int, default=3)
    parser.add_argument("--outside", type=int, default=24)
    parser.add_argument("--saturation-events", type=int, default=20)
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
        rng = np.random.default_rng(5)
        picked = rng.choice(args.num_channels - args.outside, args.dead + args.noisy, replace=False)
        damaged = work / "damaged.nwb"
        config = SynthConfig(**base, common_noise_uv=args.common_noise_uv, outside_channels=args.outside,
                             dead_channels=tuple(int(c) for c in picked[:args.dead]),
                             noisy_channels=tuple(int(c) for c in picked[args.dead:]))
        write_synthetic_session(damaged, config)
        with open_session(damaged) as session:
            positions = session.select_ephys().channel_positions_um
        from nwbflow.synth.ephys import outside_channel_indices

        truth = {"dead": sorted(config.dead_channels), "noisy": sorted(config.noisy_channels),
                 "outside": outside_channel_indices(config, positions).tolist()}
        bad_rows = _bad_channel_rows(damaged, truth)
        saturation_rows = _saturation_rows(work, base, args.saturation_events)
    print(format_table(["method", "label", "truth", "found", "wrongly labelled", "seconds"],
                       [[r["method"], r["label"], r["truth"], r["found"], r["wrong"], r["seconds"]]
                        for r in bad_rows], 100))
    print(format_table(["saturation rule", "events", "found", "false periods", "zeroed ms", "artifact peaks",
                        "spikes lost", "clean peaks near", "x real time"],
                       [[r["rule"], r["events"], r["events_found"], r["false_periods"], r["zeroed_ms"],
                         r["artifact_peaks"], r["spikes_lost"], r["clean_peaks_near"], r["x_realtime"]]
                        for r in saturation_rows], 120))
    print(format_table(["adc_phase_shift", "residual µV", "x real time"],
                       [[str(r["adc_phase_shift"]), r["residual_uv"], r["x_realtime"]] for r in rows], 100))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"session": {"num_channels": args.num_channels, "duration_s": args.duration_s,
                                                "common_noise_uv": args.common_noise_uv}, "rows": rows,
                                    "bad_channels": {"truth": truth, "rows": bad_rows},
                                    "saturation": saturation_rows}, indent=2))


if __name__ == "__main__":
    main()
