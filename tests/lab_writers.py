"""Small NWB sessions laid out the way labs' writers lay them out (NeuroConv SpikeGLX, suite2p, CaImAn).

Written with pynwb, seeded, a few seconds long; where a writer leaves something pynwb refuses to write
(a rate of 0, an index dtype the current schema rejects), raw h5py makes it afterwards.

- :func:`write_two_probe_session`: NeuroConv's multi-probe SpikeGLX layout: ``ElectricalSeriesAPImec0``,
  ``ElectricalSeriesAPImec1`` (30 kHz, int16 + conversion, one electrode group and device per probe) and
  ``ElectricalSeriesLFImec0``/``1`` (2.5 kHz) in acquisition; each AP band holds SpikeInterface
  ground-truth units.
- :func:`write_ophys_session`: one segmentation (or two planes) with the series suite2p or CaImAn write.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import h5py
import numpy as np
from pynwb import NWBHDF5IO, NWBFile
from pynwb.ecephys import ElectricalSeries
from pynwb.file import Subject
from pynwb.ophys import DfOverF, Fluorescence, ImageSegmentation, OpticalChannel

START = datetime.datetime(2024, 3, 4, 10, 0, 0, tzinfo=datetime.timezone.utc)
AP_RATE_HZ, LF_RATE_HZ, FRAME_RATE_HZ = 30_000.0, 2_500.0, 30.0
#: µV per int16 step, as SpikeGLX's 1.0 probes at gain 500.
UV_PER_BIT = 2.34375


def _nwbfile(identifier: str) -> NWBFile:
    nwbfile = NWBFile(session_description="lab-writer layout test", identifier=identifier, session_start_time=START,
                      session_id="s1", experimenter=["Tester, A."], institution="nwbflow tests")
    nwbfile.subject = Subject(subject_id="m1", species="Mus musculus", sex="M", age="P90D")
    return nwbfile


def probe_recording(num_channels: int, duration_s: float, seed: int):
    """A SpikeInterface ground truth (recording in µV, sorting) on a 2-column probe."""
    import spikeinterface.core as si

    return si.generate_ground_truth_recording(
        durations=[duration_s], sampling_frequency=AP_RATE_HZ, num_channels=num_channels, num_units=4, seed=seed,
        generate_probe_kwargs={"num_columns": 2, "xpitch": 20, "ypitch": 20, "contact_shapes": "circle",
                               "contact_shape_params": {"radius": 6}},
        generate_sorting_kwargs={"firing_rates": 8.0, "refractory_period_ms": 4.0},
        noise_kwargs={"noise_levels": 8.0, "strategy": "on_the_fly"})


def write_two_probe_session(path: Path, *, num_channels: int = 16, duration_s: float = 8.0,
                            nan_in_probe: int | None = None) -> tuple[Path, list]:
    """The two-probe session; returns (path, [ground-truth sorting of probe 0, of probe 1]).

    ``nan_in_probe``: write NaN into that probe's AP data (its series must then fail alone).
    """
    nwbfile = _nwbfile(f"two-probe-{path.stem}")
    truths = []
    for probe in (0, 1):
        recording, sorting = probe_recording(num_channels, duration_s, seed=100 + probe)
        truths.append(sorting)
        device = nwbfile.create_device(name=f"NeuropixelsImec{probe}", description="Neuropixels 1.0",
                                       manufacturer="IMEC")
        group = nwbfile.create_electrode_group(name=f"Imec{probe}", description=f"probe {probe}",
                                               location="CA1", device=device)
        first_row = len(nwbfile.electrodes) if nwbfile.electrodes is not None else 0
        xy = recording.get_channel_locations()
        for channel in range(num_channels):
            nwbfile.add_electrode(group=group, location="CA1", rel_x=float(xy[channel, 0]),
                                  rel_y=float(xy[channel, 1]))
        rows = list(range(first_row, first_row + num_channels))
        traces_uv = recording.get_traces()
        ap = np.clip(np.round(traces_uv / UV_PER_BIT), -32768, 32767).astype(np.int16)
        lf = ap[:: int(AP_RATE_HZ / LF_RATE_HZ)]
        for band, data, rate in (("AP", ap, AP_RATE_HZ), ("LF", lf, LF_RATE_HZ)):
            region = nwbfile.create_electrode_table_region(rows, f"electrodes of probe {probe}")
            nwbfile.add_acquisition(ElectricalSeries(name=f"ElectricalSeries{band}Imec{probe}", data=data,
                                                     electrodes=region, rate=rate, conversion=UV_PER_BIT * 1e-6,
                                                     description=f"{band} band of probe {probe}"))
    with NWBHDF5IO(path, "w") as io:
        io.write(nwbfile)
    if nan_in_probe is not None:  # as a broken acquisition leaves it: float data with a NaN
        with h5py.File(path, "r+") as handle:
            group = handle[f"acquisition/ElectricalSeriesAPImec{nan_in_probe}"]
            values = group["data"][()].astype(np.float32)
            values[100, 3] = np.nan
            attrs = dict(group["data"].attrs)
            del group["data"]
            data = group.create_dataset("data", data=values)
            for key, value in attrs.items():
                data.attrs[key] = value
    return path, truths


def calcium_traces(num_frames: int, num_rois: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw fluorescence with neuropil contamination, the neuropil), (frames, rois) float32."""
    rng = np.random.default_rng(seed)
    spikes = rng.random((num_frames, num_rois)) < 0.02
    kernel = np.exp(-np.arange(60) / (0.8 * FRAME_RATE_HZ))
    dff = np.stack([np.convolve(spikes[:, r], kernel)[:num_frames] for r in range(num_rois)], axis=1) * 0.3
    neuropil = 80.0 + 5.0 * np.sin(np.arange(num_frames) / 40.0)[:, None] + rng.normal(0, 1, (num_frames, num_rois))
    raw = 200.0 * (1.0 + dff) + 0.7 * neuropil + rng.normal(0, 3.0, (num_frames, num_rois))
    return raw.astype(np.float32), neuropil.astype(np.float32)


def write_ophys_session(path: Path, layout: str, *, num_frames: int = 900, num_rois: int = 5) -> Path:
    """An ophys session as a writer lays it out:

    - "suite2p": ``Fluorescence`` with ``RoiResponseSeries``, ``Neuropil``, ``Deconvolved`` (same ROIs);
    - "caiman": ``Fluorescence`` with ``RoiResponseSeries`` and ``Background_Fluorescence_Response``, written
      with ``starting_time@rate`` 0.0 (CaImAn through optinist), the ImagingPlane saying 30 Hz;
    - "two_planes": two ImagingPlanes and PlaneSegmentations, each with its own ``Fluorescence_plane<k>``;
    - "optinist": "caiman"'s traces alone, stored (ROIs, frames) as optinist writes its inputs;
    - "ambiguous": one segmentation, two raw fluorescence series (``RoiResponseSeries``, ``Raw``);
    - "old_index": "suite2p" with pixel masks whose ``pixel_mask_index`` is int64 (pynwb 1.x wrote it so;
      the current schema wants unsigned): a schema problem of the input's own.
    """
    nwbfile = _nwbfile(f"ophys-{layout}-{path.stem}")
    device = nwbfile.create_device(name="Microscope", description="two-photon microscope")
    module = nwbfile.create_processing_module("ophys", "optical physiology")
    segmentation = ImageSegmentation()
    module.add(segmentation)
    planes = 2 if layout == "two_planes" else 1
    for plane_index in range(planes):
        plane = nwbfile.create_imaging_plane(
            name=f"ImagingPlane{plane_index}", optical_channel=OpticalChannel("Green", "GCaMP", 510.0),
            description="plane", device=device, excitation_lambda=920.0, imaging_rate=FRAME_RATE_HZ,
            indicator="GCaMP6s", location="V1")
        table = segmentation.create_plane_segmentation(description="ROIs", imaging_plane=plane,
                                                       name=f"PlaneSegmentation{plane_index}" if planes > 1
                                                       else "PlaneSegmentation")
        for roi in range(num_rois):
            table.add_roi(pixel_mask=[(roi, roi, 1.0), (roi + 1, roi, 0.5)])
        rois = table.create_roi_table_region(region=list(range(num_rois)), description="all ROIs")
        raw, neuropil = calcium_traces(num_frames, num_rois, seed=plane_index)
        container = Fluorescence(name=f"Fluorescence_plane{plane_index}" if planes > 1 else "Fluorescence")
        module.add(container)
        clock = {"rate": 0.0 if layout in ("caiman", "optinist") else FRAME_RATE_HZ}
        container.create_roi_response_series(name="RoiResponseSeries", data=raw.T if layout == "optinist" else raw,
                                             rois=rois, unit="a.u.", **clock)
        if layout in ("suite2p", "old_index"):
            container.create_roi_response_series(name="Neuropil", data=neuropil, rois=rois, unit="a.u.", **clock)
            container.create_roi_response_series(name="Deconvolved", data=np.maximum(raw - raw.mean(0), 0),
                                                 rois=rois, unit="a.u.", **clock)
        if layout == "caiman":
            container.create_roi_response_series(name="Background_Fluorescence_Response", data=neuropil,
                                                 rois=rois, unit="a.u.", **clock)
        if layout == "ambiguous":
            container.create_roi_response_series(name="Raw", data=raw * 1.01, rois=rois, unit="a.u.", **clock)
            dff = DfOverF(name="DfOverF")
            module.add(dff)
            dff.create_roi_response_series(name="RoiResponseSeries", data=raw / raw.mean(0) - 1, rois=rois,
                                           unit="n.a.", **clock)
    with NWBHDF5IO(path, "w") as io:
        io.write(nwbfile)
    if layout == "old_index":
        with h5py.File(path, "r+") as handle:
            group = handle["processing/ophys/ImageSegmentation/PlaneSegmentation"]
            attrs = dict(group["pixel_mask_index"].attrs)
            values = group["pixel_mask_index"][()].astype(np.int64)
            del group["pixel_mask_index"]
            index = group.create_dataset("pixel_mask_index", data=values)
            for key, value in attrs.items():
                index.attrs[key] = value
    return path
