"""Fuzzing the reader: a mutated small session gives a clean NwbflowError naming the file, or a result.

Each example copies a tiny valid session (2 s, 8 channels, 4 ROIs, gzip-compressed data), applies one
to three mutations -- with h5py: a deleted dataset or attribute, a dataset cast to another dtype or
shape, a rate of 0 / negative / NaN, NaN or constant data, another ``neurodata_type`` or
``nwb_version``, any attribute set to an odd value; then on the bytes: flipped bits, an overwritten
span, truncation -- and runs the cheap part of the pipeline in a worker process under a time limit:
``check_input``, ``plan_session`` (the content-hash pass that checks every value), preprocess and
peaks on the ElectricalSeries, and the ROI traces the calcium stage reads. Anything but success or
an ``NwbflowError`` naming the file (a crash), or running past the limit (a hang), fails; the input
must be byte-identical afterwards.
"""

from __future__ import annotations

import collections
import multiprocessing
import shutil
import traceback
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import sha256_of

#: Seconds one example may take in the worker; a normal one takes well under one.
EXAMPLE_TIMEOUT_S = 30.0
SERIES = ("acquisition/ElectricalSeries", "processing/ophys/Fluorescence/RoiResponseSeries")
TYPES = ("ElectricalSeries", "RoiResponseSeries", "SpikeEventSeries", "TimeSeries", "NWBFile",
         "DynamicTable", "PlaneSegmentation", "NoSuchType", "")
VERSIONS = ("1.0.5", "NWB-1.0.6", "2.0b", "2.99.0", "3.0.0", "", "not a version")
DTYPES = ("int8", "uint16", "float16", "float64", "bool", "S8")
ODD_VALUES = (0, -1, float("nan"), float("inf"), 1e300, "text", b"", np.arange(3), np.zeros((2, 2)))
H5_KINDS = ("delete_dataset", "delete_attribute", "retype", "reshape", "set_rate", "non_finite",
            "constant", "set_type", "set_version", "set_attribute")

#: Outcomes seen in this test session, printed at the end (``-s``): "ok", "bad input: <first words>".
OUTCOMES: collections.Counter = collections.Counter()


# --- the worker -------------------------------------------------------------------------------

def _warm_up() -> str:
    """Import what the examples need once, in the worker; one torch thread (the machine is shared)."""
    import importlib

    import torch

    for module in ("nwbflow.ephys.peaks", "nwbflow.ephys.preprocess", "nwbflow.tasks.plan"):
        importlib.import_module(module)
    torch.set_num_threads(1)
    return "ready"


def run_pipeline_part(nwb_path: str, workdir: str) -> tuple[str, str, str]:
    """check_input, plan_session, preprocess + peaks, ROI traces: ("ok" | "error" | "crash", type, text)."""
    from nwbflow.ephys.peaks import iter_peaks
    from nwbflow.ephys.preprocess import preprocess_to_binary
    from nwbflow.errors import NwbflowError
    from nwbflow.nwb_io.read import open_session
    from nwbflow.params import SessionParams
    from nwbflow.tasks.plan import check_input, plan_session

    params = SessionParams(execution={"device": "cpu"})
    try:
        check_input(nwb_path, params)
        plan = plan_session(nwb_path, params, workdir)
        with open_session(plan.nwb_path) as session:
            for planned in plan.series:
                if planned.kind == "ephys":
                    series = session.select_ephys(planned.object)
                    result = preprocess_to_binary(series, params.preprocess, Path(workdir) / "pre.bin")
                    for batch in iter_peaks(result.open(), series.channel_positions_um, params.peaks,
                                            whitening_inverse=result.whitening_inverse):
                        series.sample_times_s(batch["sample_index"])
                else:
                    session.read_roi_traces(session.roi_info(planned.object).object_path)
    except NwbflowError as exc:
        return "error", type(exc).__name__, str(exc)
    except Exception as exc:  # the thing this test looks for: report it with its traceback
        return "crash", type(exc).__name__, traceback.format_exc()
    return "ok", "", ""


class Worker:
    """One spawned process running examples one at a time; killed and replaced after a hang."""

    def __init__(self):
        self._context = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._pool = self._context.Pool(1)
        assert self._pool.apply_async(_warm_up).get(timeout=300) == "ready"

    def run(self, nwb_path: Path, workdir: Path) -> tuple[str, str, str]:
        pending = self._pool.apply_async(run_pipeline_part, (str(nwb_path), str(workdir)))
        try:
            return pending.get(timeout=EXAMPLE_TIMEOUT_S)
        except multiprocessing.TimeoutError:
            self._pool.terminate()
            self._start()
            return "hang", "", f"no result after {EXAMPLE_TIMEOUT_S:g} s"

    def close(self) -> None:
        self._pool.terminate()


# --- the base session and what can be mutated in it ---------------------------------------------

class Base:
    """The valid session every example starts from, and an inventory of its objects."""

    def __init__(self, path: Path):
        from nwbflow.synth import SynthConfig, write_synthetic_session

        write_synthetic_session(path, SynthConfig(duration_s=2.0, num_channels=8, num_units=3, num_rois=4,
                                                  seed=3, compression=True))
        self.path, self.size = path, path.stat().st_size
        self.datasets: list[str] = []
        self.typed_groups: list[str] = []
        self.attributes: list[tuple[str, str]] = []
        with h5py.File(path, "r") as handle:
            handle.visititems(self._collect)
            self.attributes += [("/", name) for name in handle.attrs]

    def _collect(self, name: str, obj) -> None:
        if name.startswith("specifications"):
            return
        if isinstance(obj, h5py.Dataset):
            self.datasets.append(name)
        elif "neurodata_type" in obj.attrs:
            self.typed_groups.append(name)
        self.attributes += [(name, attr) for attr in obj.attrs]


def h5_mutations(base: Base) -> st.SearchStrategy:
    """One mutation made with h5py, as a tuple (kind, arguments...)."""
    dataset, group = st.sampled_from(base.datasets), st.sampled_from(base.typed_groups)
    series = st.sampled_from(SERIES)
    return st.one_of(
        st.tuples(st.just("delete_dataset"), dataset),
        st.tuples(st.just("delete_attribute"), st.sampled_from(base.attributes)),
        st.tuples(st.just("retype"), dataset, st.sampled_from(DTYPES)),
        st.tuples(st.just("reshape"), dataset, st.sampled_from(("rows:0", "rows:1", "rows:2", "rows:3",
                                                                   "transpose", "flatten", "scalar",
                                                                   "add_axis"))),
        st.tuples(st.just("set_rate"), series, st.sampled_from((0.0, -30_000.0, float("nan"), float("inf"),
                                                                 1e-9, 1e12))),
        st.tuples(st.just("non_finite"), series, st.sampled_from(("one", "column", "all")),
                  st.sampled_from((float("nan"), float("inf"), -float("inf")))),
        st.tuples(st.just("constant"), series),
        st.tuples(st.just("set_type"), group, st.sampled_from(TYPES)),
        st.tuples(st.just("set_version"), st.sampled_from(VERSIONS)),
        st.tuples(st.just("set_attribute"), st.sampled_from(base.attributes),
                  st.sampled_from(range(len(ODD_VALUES)))),
    )


def byte_mutations(base: Base) -> st.SearchStrategy:
    """One mutation of the file's bytes, as a tuple (kind, arguments...)."""
    offset = st.integers(0, base.size - 1)
    return st.one_of(
        st.tuples(st.just("flip"), offset, st.integers(0, 7)),
        st.tuples(st.just("overwrite"), offset, st.binary(min_size=1, max_size=256)),
        st.tuples(st.just("truncate"), offset),
    )


def apply(path: Path, mutation: tuple) -> bool:
    """Make ``mutation`` on the file; False when it does not apply (its target is gone)."""
    kind, *args = mutation
    if kind in H5_KINDS:
        with h5py.File(path, "r+") as handle:
            return _H5_APPLY[kind](handle, *args)
    data = bytearray(path.read_bytes())
    offset = args[0] % max(len(data), 1)  # a truncation may have come first
    if kind == "flip" and data:
        data[offset] ^= 1 << args[1]
    elif kind == "overwrite":
        payload = args[1][:len(data) - offset]
        data[offset:offset + len(payload)] = payload
    else:
        del data[offset:]
    path.write_bytes(bytes(data))
    return True


def _replace(group: h5py.Group, name: str, values: np.ndarray, dtype=None) -> None:
    """``group[name] = values`` keeping the old dataset's attributes."""
    attrs = dict(group[name].attrs)
    del group[name]
    dataset = group.create_dataset(name, data=values, dtype=dtype)
    for key, value in attrs.items():
        dataset.attrs[key] = value


def _retype(handle, name, dtype) -> bool:
    if name not in handle:
        return False
    values = np.asarray(handle[name][()])
    if values.dtype.kind in "iufb":
        new = values.astype(dtype)
    else:  # strings or references: numbers or bytes of that shape
        new = np.full(values.shape, b"x", dtype) if dtype == "S8" else np.zeros(values.shape, dtype)
    group, leaf = handle[name].parent, name.rsplit("/", 1)[-1]
    _replace(group, leaf, new)
    return True


def _reshape(handle, name, how) -> bool:
    if name not in handle:
        return False
    dataset = handle[name]
    values = np.asarray(dataset[()])
    if how.startswith("rows:"):
        new = values.reshape(-1)[:int(how[5:])] if values.ndim == 0 else values[:int(how[5:])]
    elif how == "transpose":
        new = values.T
    elif how == "flatten":
        new = values.reshape(-1)
    elif how == "scalar":
        new = values.reshape(-1)[0] if values.size else np.zeros((), values.dtype)
    else:
        new = values[..., None]
    _replace(dataset.parent, name.rsplit("/", 1)[-1], np.ascontiguousarray(new), dtype=dataset.dtype)
    return True


def _set_rate(handle, series, rate) -> bool:
    if f"{series}/starting_time" not in handle:
        return False
    handle[f"{series}/starting_time"].attrs["rate"] = rate
    return True


def _non_finite(handle, series, where, value) -> bool:
    name = f"{series}/data"
    if name not in handle or handle[name].dtype.kind not in "iuf" or handle[name].size == 0:
        return False
    values = handle[name][()].astype(np.float32)
    flat = values.reshape(len(values), -1)
    if where == "one":
        flat[len(flat) // 2, -1] = value
    elif where == "column":
        flat[:, 0] = value
    else:
        flat[:] = value
    _replace(handle[series], "data", flat.reshape(values.shape))
    return True


def _constant(handle, series) -> bool:
    name = f"{series}/data"
    if name not in handle:
        return False
    _replace(handle[series], "data", np.zeros(handle[name].shape, handle[name].dtype), dtype=handle[name].dtype)
    return True


def _set_attribute(handle, target, index) -> bool:
    obj, attr = target
    if obj not in handle:
        return False
    handle[obj].attrs[attr] = ODD_VALUES[index]
    return True


def _delete_dataset(handle, name) -> bool:
    if name not in handle:
        return False
    del handle[name]
    return True


def _delete_attribute(handle, target) -> bool:
    obj, attr = target
    if obj not in handle or attr not in handle[obj].attrs:
        return False
    del handle[obj].attrs[attr]
    return True


def _set_type(handle, group, name) -> bool:
    if group not in handle:
        return False
    handle[group].attrs["neurodata_type"] = name
    return True


def _set_version(handle, version) -> bool:
    handle.attrs["nwb_version"] = version
    return True


_H5_APPLY = {"delete_dataset": _delete_dataset, "delete_attribute": _delete_attribute, "retype": _retype,
             "reshape": _reshape, "set_rate": _set_rate, "non_finite": _non_finite, "constant": _constant,
             "set_type": _set_type, "set_version": _set_version, "set_attribute": _set_attribute}


# --- the tests --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    base, worker = Base(folder / "base.nwb"), Worker()
    yield base, worker, folder
    worker.close()
    print("\nfuzz outcomes:", dict(OUTCOMES.most_common()))


def check_example(base: Base, worker: Worker, folder: Path, mutations: list[tuple]) -> None:
    path, workdir = folder / "example.nwb", folder / "work"
    shutil.copyfile(base.path, path)
    shutil.rmtree(workdir, ignore_errors=True)
    # h5py edits first: they need a file h5py can still open; byte damage comes last, truncation at the end.
    for mutation in sorted(mutations, key=lambda m: (m[0] not in H5_KINDS, m[0] == "truncate")):
        assume(apply(path, mutation))
    before = sha256_of(path)
    outcome, name, text = worker.run(path, workdir)
    assert outcome in ("ok", "error"), f"{outcome} after {mutations}: {name}\n{text}"
    if outcome == "error":
        assert str(path) in text and len(text) > len(str(path)) + 10, f"{name} does not name the file: {text}"
    OUTCOMES["ok" if outcome == "ok" else f"{name}: {' '.join(text[len(str(path)) + 2:].split()[:4])}"] += 1
    assert sha256_of(path) == before, f"the input changed under {mutations}"


def mutation_lists(data, base: Base) -> list[tuple]:
    one = st.one_of(h5_mutations(base), h5_mutations(base), byte_mutations(base))
    return data.draw(st.lists(one, min_size=1, max_size=3), label="mutations")


FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                            HealthCheck.function_scoped_fixture])


@settings(max_examples=300, **FUZZ_SETTINGS)
@given(data=st.data())
def test_mutated_sessions_give_a_clean_error_or_a_result(fuzz, data):
    base, worker, folder = fuzz
    check_example(base, worker, folder, mutation_lists(data, base))


@pytest.mark.slow
@settings(max_examples=3000, **FUZZ_SETTINGS)
@given(data=st.data())
def test_mutated_sessions_many_examples(fuzz, data):
    base, worker, folder = fuzz
    check_example(base, worker, folder, mutation_lists(data, base))
