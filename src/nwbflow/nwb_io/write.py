"""Write-back: export the input session to a new, processed NWB file, atomically.

The input is opened read-only and never changed. The processed file gets a new object id and identifier
(DANDI sees its own asset), the results (``nwbflow.nwb_io.results``) and, by default, none of the bulk
acquisition data (``nwbflow.nwb_io.lean``; ``copy_raw`` keeps a self-contained copy). It is exported under
a temporary name beside the target, re-opened and validated, fsynced, and only then renamed into place;
the directory is fsynced after the rename. A process killed at any instant leaves the target either absent
(or as it was) or complete.

Validation: the input is validated once (pynwb's schema validation); the processed file is refused only for
a blocking finding the input did not already have (one introduced by write-back). The input's own
findings come back in the :class:`WriteReport`, for the run's summary.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import shutil
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from pynwb import NWBHDF5IO

from nwbflow.atomic import atomic_path, remove_stale_partials
from nwbflow.errors import BadInputError, NwbflowError, OutputWriteError
from nwbflow.extensions import NAMESPACE
from nwbflow.nwb_io import layout
from nwbflow.nwb_io.lean import bulk_series, drop_bulk
from nwbflow.nwb_io.results import SessionResults, add_results, object_at
from nwbflow.nwb_io.validate import Finding, ValidationReport, validate_file

log = logging.getLogger(__name__)

_EXPORT_CONTEXT = multiprocessing.get_context("forkserver")
_EXPORT_CONTEXT.set_forkserver_preload([__name__])
#: The only validator write-back runs (fast, on structure); nwbinspector and dandi are dandi-prep's.
WRITE_VALIDATORS = ("pynwb",)
#: Neurodata types whose ``data`` is bulk (what a lean file leaves out); for the free-space estimate.
_BULK_TYPE_NAMES = ("ElectricalSeries", "TwoPhotonSeries", "OnePhotonSeries")


@dataclass(frozen=True)
class WriteReport:
    """What write-back did: the file, the bulk series left out, and the input's own validation findings."""

    path: Path
    dropped: tuple[str, ...]
    input_findings: tuple[Finding, ...]


def write_processed(input_path: str | Path, output_path: str | Path, results: SessionResults, *,
                    copy_raw: bool = False) -> WriteReport:
    """Export ``input_path`` with ``results`` added to ``output_path``, atomically (module docstring).

    ``copy_raw``: keep the bulk acquisition data (a self-contained file); default: leave it out.
    """
    input_path, output_path = Path(input_path).resolve(), Path(output_path).absolute()
    remove_stale_partials(output_path)  # what a killed run left takes space too
    _check_free_space(input_path, output_path, results, copy_raw)
    baseline = validate_file(input_path, WRITE_VALIDATORS)
    try:
        with atomic_path(output_path, suffix=".nwb") as tmp_path:
            dropped = _export_in_child(input_path, tmp_path, results, copy_raw)
            _validate(tmp_path, output_path, baseline)
    except (OSError, RuntimeError) as exc:  # disk full, quota, I/O error: the temporary is gone, input untouched
        if not isinstance(exc, OSError) and "write failed" not in str(exc):  # HDF5 reports some as RuntimeError
            raise
        raise OutputWriteError(f"{output_path}: writing the processed file failed ({exc}); nothing was "
                               f"written there and the input is unchanged. Free space in {output_path.parent} "
                               "(or choose another output) and run again: finished stages are reused") from exc
    for finding in baseline.findings:
        log.warning("%s: the input's own problem (kept as it was): %s: %s", input_path, finding.location,
                    finding.message)
    log.info("wrote %s%s", output_path, f" (left out: {', '.join(dropped)})" if dropped else "")
    return WriteReport(output_path, tuple(dropped), baseline.findings)


def units_destination(input_path: str | Path) -> str:
    """Where write-back puts sorted units: the file's ``units``, or ``processing/ecephys/units_nwbflow`` when
    the input already has a Units table (a curated sorting, say), which stays as it is."""
    with h5py.File(input_path, "r", locking=False) as handle:
        return layout.units_path(isinstance(handle.get("units"), h5py.Group))


def check_target(input_path: str | Path, output_path: str | Path) -> None:
    """BadInputError unless ``output_path`` can be written: its folder exists and is writable, not the input."""
    input_path, output_path = Path(input_path).resolve(), Path(output_path).absolute()
    if not output_path.parent.is_dir():
        raise BadInputError("output directory does not exist", path=output_path,
                            fix=f"create {output_path.parent} first")
    if not os.access(output_path.parent, os.W_OK | os.X_OK):
        raise BadInputError("output directory is not writable", path=output_path,
                            fix=f"choose an output in a folder you can write, or fix the permissions of "
                                f"{output_path.parent}")
    if output_path.exists() and output_path.samefile(input_path):
        raise BadInputError("output path is the input file; the input is never modified",
                            path=output_path, fix="choose another output path")


def _check_free_space(input_path: Path, output_path: Path, results: SessionResults, copy_raw: bool) -> None:
    """OutputWriteError when the output's disk has clearly too little room, before anything is written.

    The need is estimated as what the export copies (the input, less its bulk data for a lean file) plus
    twice the result files (parquet and npz are denser than HDF5), plus 16 MiB of headroom.
    """
    copied = input_path.stat().st_size - (0 if copy_raw else _bulk_bytes(input_path))
    need = max(copied, 0) + 2 * sum(Path(f).stat().st_size for f in results.files()) + (16 << 20)
    free = shutil.disk_usage(output_path.parent).free
    if free < need:
        raise OutputWriteError(f"{output_path}: not enough free space for the processed file: about "
                               f"{need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free in {output_path.parent}; "
                               "nothing was written and the input is unchanged. Free space (or choose another "
                               "output) and run again: finished stages are reused")


def _bulk_bytes(input_path: Path) -> int:
    """Bytes stored by the ``data`` of the input's bulk series (what a lean file leaves out)."""
    total = 0

    def visit(_name: str, obj) -> None:
        nonlocal total
        if isinstance(obj, h5py.Group) and isinstance(obj.get("data"), h5py.Dataset) \
                and str(obj.attrs.get("neurodata_type", "")) in _BULK_TYPE_NAMES:
            total += obj["data"].id.get_storage_size()

    with h5py.File(input_path, "r", locking=False) as handle:
        handle.visititems(visit)
    return total


def _export_in_child(input_path: Path, tmp_path: Path, results: SessionResults, copy_raw: bool) -> list[str]:
    """``_export`` in a child process: HDF5 can abort its process when a write fails (a full disk during
    pynwb's export ends in 'double free or corruption'), which must fail this write, not the whole run.

    The child comes from a fork server that has the NWB stack imported, so each export starts in milliseconds
    after the first; an error raised in the child is raised here. Returns the bulk series left out. The child
    runs this one export and ends (no pool: a pool's idle worker waits for work on a queue whose pipe it
    holds itself, so a parent killed at the wrong moment left it, and the fork server, waiting for good).
    """
    receive, send = _EXPORT_CONTEXT.Pipe(duplex=False)
    child = _EXPORT_CONTEXT.Process(target=_export_and_send, args=(send, input_path, tmp_path, results, copy_raw),
                                    name="nwbflow-export", daemon=True)
    child.start()
    send.close()  # the child's copy is the only one left: its end (or death) is an end of file here
    try:
        failed, value = receive.recv()
    except EOFError:
        child.join()
        raise OSError(f"the export process died (exit code {child.exitcode}) while writing {tmp_path.name} "
                      "(HDF5 aborts on a failed write, e.g. on a full disk)") from None
    finally:
        receive.close()
    child.join()
    if failed:
        raise value
    return value


def _export_and_send(send, input_path: Path, tmp_path: Path, results: SessionResults, copy_raw: bool) -> None:
    """The export child: ``_export``'s result, or the exception it raised (its traceback as a note), sent back."""
    try:
        outcome = (False, _export(input_path, tmp_path, results, copy_raw))
    except Exception as exc:  # noqa: BLE001 - raised again in the parent, with this traceback attached
        exc.add_note("in the export process:\n" + traceback.format_exc())
        outcome = (True, exc)
    try:
        send.send(outcome)
    except (pickle.PicklingError, TypeError, AttributeError) as unpicklable:  # an exception pickle cannot carry
        send.send((True, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]} ({unpicklable})")))
    send.close()


def _export(input_path: Path, tmp_path: Path, results: SessionResults, copy_raw: bool) -> list[str]:
    with NWBHDF5IO(str(input_path), mode="r", load_namespaces=True) as src_io:
        try:
            nwbfile = src_io.read()
        except Exception as exc:  # pynwb raises many types for unreadable content
            raise BadInputError(f"pynwb cannot read this file for export ({type(exc).__name__}: {exc})",
                                path=input_path, fix="check the file with `pynwb.validate`") from exc
        electrode_rows = {}
        for units in results.units:  # read before the series may be dropped
            series = object_at(nwbfile, units.electrical_series)
            if series is None:
                raise BadInputError("the series the units were sorted from is not in the file",
                                    path=input_path, obj=units.electrical_series)
            electrode_rows[units.electrical_series] = np.asarray(series.electrodes.data[:], dtype=np.int64)
        dropped = [] if copy_raw or not bulk_series(nwbfile) else drop_bulk(nwbfile)
        add_results(nwbfile, results, input_path, nwbfile.identifier, electrode_rows)
        nwbfile.generate_new_id()
        # NWBFile.identifier has no setter; an exported asset needs its own identifier.
        nwbfile.fields["identifier"] = str(uuid.uuid4())
        nwbfile.set_modified()
        with NWBHDF5IO(str(tmp_path), mode="w") as out_io:
            out_io.export(src_io=src_io, nwbfile=nwbfile)
    return dropped


def _validate(tmp_path: Path, output_path: Path, baseline: ValidationReport) -> None:
    """NwbflowError when write-back introduced a blocking finding (one the input does not have)."""
    introduced = [f for f in validate_file(tmp_path, WRITE_VALIDATORS).introduced_over(baseline, at_least="ERROR")]
    if introduced:
        raise NwbflowError(f"{output_path}: the processed file fails NWB schema validation, so it was not written: "
                           + "; ".join(f"{f.location}: {f.message}" for f in introduced[:5]))
    with h5py.File(tmp_path, "r") as h5:
        if f"specifications/{NAMESPACE}" not in h5:
            raise NwbflowError(f"{output_path}: the ndx-nwbflow spec was not cached in the file")
