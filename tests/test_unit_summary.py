"""The unit summary figure (nwbflow.plots.unit_summary_png): written, a valid PNG of bounded size, capped, checked."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nwbflow.errors import BadInputError
from nwbflow.plots import largest_units, unit_summary_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RATE_HZ = 30_000.0


def synthetic_units(num_units: int, num_channels: int, num_spikes: int, seed: int = 0) -> dict:
    """Templates (µV) with a trough decaying with distance from a random contact of a 2-column probe,
    spikes with a 2 ms refractory period, amplitudes around each unit's trough."""
    rng = np.random.default_rng(seed)
    positions = np.stack([np.tile([0.0, 32.0], num_channels // 2),
                          np.repeat(np.arange(num_channels // 2) * 20.0, 2)], axis=1)
    t_ms = np.arange(60) / RATE_HZ * 1e3
    shape = -np.exp(-((t_ms - 0.7) / 0.15) ** 2) + 0.4 * np.exp(-((t_ms - 1.2) / 0.3) ** 2)
    centres = positions[rng.integers(0, num_channels, num_units)]  # on a contact: peak-to-peak = trough x shape's
    distance = np.linalg.norm(positions[None] - centres[:, None], axis=2)
    trough_uv = np.linspace(300.0, 50.0, num_units)  # unit 0 largest
    templates = (trough_uv[:, None, None] * shape[None, :, None] * np.exp(-distance / 30.0)[:, None, :])
    units = rng.integers(0, num_units, num_spikes)
    times = np.sort(rng.uniform(0.0, 120.0, num_spikes))
    times = times + 0.002 * np.arange(num_spikes)  # consecutive spikes >= 2 ms apart
    return {"templates": templates.astype(np.float32), "channel_positions_um": positions, "spike_times_s": times,
            "spike_units": units, "spike_amplitudes": -trough_uv[units] * rng.normal(1.0, 0.1, num_spikes),
            "sampling_rate_hz": RATE_HZ}


def test_writes_a_png_of_bounded_size(tmp_path):
    path = unit_summary_png(**synthetic_units(5, 16, 3000), path=tmp_path / "units.png", title="5 units")
    data = path.read_bytes()
    assert path == tmp_path / "units.png"
    assert data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert (width, height) == (1600, 1000)
    assert 20_000 < len(data) < 2_000_000


def test_largest_units_are_drawn_first_and_capped(tmp_path):
    case = synthetic_units(40, 32, 20_000)
    shown = largest_units(case["templates"], 7)
    np.testing.assert_array_equal(shown, np.arange(7))  # troughs decrease with the index
    assert len(largest_units(case["templates"], 100)) == 40
    small = unit_summary_png(**case, path=tmp_path / "7.png", title="capped", max_units=7)
    assert small.read_bytes()[:8] == PNG_SIGNATURE


def test_no_spikes_or_no_units_still_render(tmp_path):
    case = synthetic_units(3, 8, 0)
    assert unit_summary_png(**case, path=tmp_path / "quiet.png", title="quiet").is_file()
    case["templates"] = case["templates"][:0]
    assert unit_summary_png(**case, path=tmp_path / "none.png", title="none").is_file()


@pytest.mark.parametrize("change, message", [
    ({"templates": np.zeros((5, 60), np.float32)}, "templates must be"),
    ({"channel_positions_um": np.zeros((15, 2))}, "channel_positions_um must be"),
    ({"spike_amplitudes": np.zeros(10)}, "one length"),
    ({"spike_units": np.full(3000, 5)}, r"in \[0, 5\)"),
    ({"spike_units": np.zeros(3000, np.float64)}, "integers"),
    ({"sampling_rate_hz": 0.0}, "positive"),
])
def test_mismatched_inputs_are_refused(tmp_path, change, message):
    case = {**synthetic_units(5, 16, 3000), **change}
    with pytest.raises(BadInputError, match=message):
        unit_summary_png(**case, path=tmp_path / "bad.png", title="bad")
    assert not (tmp_path / "bad.png").exists()


def test_max_units_must_be_positive(tmp_path):
    with pytest.raises(BadInputError, match="max_units"):
        unit_summary_png(**synthetic_units(5, 16, 100), path=tmp_path / "bad.png", title="bad", max_units=0)


@pytest.mark.slow
def test_fast_for_a_large_sorting(tmp_path):
    """100 units on 384 channels, 10^6 spikes: under 3 s (about 1 s measured on 2 CPU cores)."""
    case = synthetic_units(100, 384, 1_000_000)
    started = time.perf_counter()
    path = unit_summary_png(**case, path=tmp_path / "large.png", title="large", max_units=32)
    assert time.perf_counter() - started < 3.0
    assert len(path.read_bytes()) < 2_000_000
