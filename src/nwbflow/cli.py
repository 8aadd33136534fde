"""``nwbflow`` command line: run, synth, nightly, dandi-prep, demo, worker, service-automations.

Exit codes (a contract): 0 success, 2 bad input (one line naming file,
object and fix; a traceback only with ``--debug``), 1 any other failure;
``dandi-prep`` exits 3 when it ran but some file would be refused by
``dandi upload`` (the report says which and how to fix it); ``run`` exits 4
when another nwbflow run is writing the same output (its lock file is held):
nothing was done, try again once that run ended or choose another output;
``run`` exits 5 when some series (probe, imaging plane) failed and others did
not: the output holds the others' results, the failed ones are named.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from nwbflow import __version__
from nwbflow.errors import BadInputError, OutputBusyError, PartialResultsError
from nwbflow.params import STAGE_ORDER

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_BLOCKED, EXIT_BUSY, EXIT_PARTIAL = 0, 1, 2, 3, 4, 5


def main(argv: list[str] | None = None) -> int:
    # Library logs (logging.getLogger("nwbflow...")) go to Prefect's handlers and the UI.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "nwbflow")
    # ... and records logged outside a flow run (the pre-flight check of `run`) only to the console,
    # without Prefect's "attempted to send logs to the API without a flow run id" warning each time.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry errors
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "worker":  # everything after `worker` belongs to `prefect worker start`
        args.worker_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.debug and args.command in ("run", "nightly", "dandi-prep", "demo"):
        _hide_tracebacks()
    try:
        return args.handler(args)
    except BadInputError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"nwbflow: bad input: {exc.one_line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OutputBusyError as exc:
        print(f"nwbflow: busy: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except KeyboardInterrupt:
        print("nwbflow: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: every other failure is exit code 1
        if args.debug:
            traceback.print_exc()
        print(f"nwbflow: failed: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = argparse.ArgumentParser(prog="nwbflow", parents=[common],
                                     description="Process NWB sessions with Prefect flows.")
    parser.add_argument("--version", action="version", version=f"nwbflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="process one NWB session",
                         description="Run the process_session flow on IN.nwb and write OUT.nwb.")
    run.add_argument("input", metavar="IN.nwb", help="input NWB file (opened read-only)")
    run.add_argument("-o", "--output", metavar="OUT.nwb", required=True, help="processed NWB file to write")
    run.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGE_ORDER)} "
                                      "(default: every built stage that applies)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device (default auto)")
    run.add_argument("--params", metavar="PARAMS.json|yaml", help="stage parameters file")
    run.add_argument("--workdir", metavar="DIR", help="work directory for artifacts "
                                                      "(default: OUT's directory/.nwbflow-work)")
    run.set_defaults(handler=_run)

    synth = sub.add_parser("synth", parents=[common], help="write a synthetic NWB session with ground truth",
                           description="Write a seeded synthetic session; ground truth goes to sidecars.")
    synth.add_argument("output", metavar="OUT.nwb")
    synth.add_argument("--duration-s", type=float, default=30.0, help="recording duration (s)")
    synth.add_argument("--num-channels", type=int, default=32)
    synth.add_argument("--num-units", type=int, default=10)
    synth.add_argument("--num-rois", type=int, default=20)
    synth.add_argument("--drift", action="store_true", help="add probe drift")
    synth.add_argument("--no-ephys", action="store_true", help="leave out the ElectricalSeries")
    synth.add_argument("--no-ophys", action="store_true", help="leave out the calcium imaging data")
    synth.add_argument("--adc-shifts", action="store_true",
                       help="sample channels at Neuropixels 1.0 ADC delays (written as inter_sample_shift)")
    synth.add_argument("--common-noise-uv", type=float, default=0.0,
                       help="RMS (µV) of a common-mode signal on every channel (default 0)")
    synth.add_argument("--dead-channels", type=int, nargs="*", default=[], metavar="C",
                       help="channels that record nothing (1 µV of their own noise)")
    synth.add_argument("--noisy-channels", type=int, nargs="*", default=[], metavar="C",
                       help="channels with 4x the noise")
    synth.add_argument("--outside-channels", type=int, default=0, metavar="N",
                       help="contacts at the top of the probe outside the brain (no spikes, no shared signal)")
    synth.add_argument("--saturation-events", type=int, default=0, metavar="N",
                       help="artifacts of 2-20 ms that drive every channel past the rails (clipped at "
                            "--saturation-rail-uv)")
    synth.add_argument("--saturation-rail-uv", type=float, default=1200.0,
                       help="where the amplifier clips, µV (default 1200: Neuropixels 1.0)")
    synth.add_argument("--shanks", type=int, default=1,
                       help="1 (Neuropixels 1.0-like), or a Neuropixels 2.0-like probe of N shanks 250 µm apart")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace OUT.nwb and its sidecars if present")
    synth.set_defaults(handler=_synth)

    nightly = sub.add_parser("nightly", parents=[common], help="process new or changed sessions under ROOT",
                             description="Run the nightly flow once: every NWB file under ROOT that is new, "
                                         "changed, or processed with other parameters or code is processed; "
                                         "the rest are skipped. A <session>.nwbflow.yaml beside a file overlays "
                                         "the parameters for that session.")
    nightly.add_argument("root", metavar="ROOT", help="data root to scan for *.nwb")
    nightly.add_argument("--out", metavar="DIR", help="where processed files go (default ROOT/processed)")
    nightly.add_argument("--params", metavar="PARAMS.json|yaml", help="stage parameters file")
    nightly.add_argument("--workdir", metavar="DIR", help="work directory (default OUT/.nwbflow-work)")
    nightly.set_defaults(handler=_nightly)

    dandi = sub.add_parser(
        "dandi-prep", parents=[common], help="check NWB files for DANDI upload, report fixes, organize",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check every NWB file under ROOT (raw and processed) the way `dandi upload` does, report "
                    "each blocker with its fix, and put the ready ones under DANDI's names in DANDISET_DIR "
                    "(hard links or copies; originals are never changed).\n\n"
                    "Exit codes: 0 all ready, 3 some file blocked (see the report), 2 bad input, 1 failure.\n\n"
                    "meta.yaml supplies missing metadata explicitly; it is written into processed copies only:\n"
                    "  subjects:                 # by subject_id\n"
                    "    mouse-001: {species: Mus musculus, sex: M, age: P90D}\n"
                    "  sessions:                 # by NWBFile.session_id\n"
                    "    s1: {subject_id: mouse-001, utc_offset: '+01:00'}\n"
                    "  files:                    # by path relative to ROOT\n"
                    "    m1/s1_processed.nwb: {session_id: s1}")
    dandi.add_argument("root", metavar="ROOT", help="folder with the NWB files (searched recursively)")
    dandi.add_argument("--out", metavar="DANDISET_DIR", required=True,
                       help="Dandiset folder (e.g. from `dandi download`); report in DANDISET_DIR/.nwbflow-dandi-prep")
    dandi.add_argument("--metadata", metavar="meta.yaml", help="explicitly supplied subject/session metadata")
    dandi.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    dandi.set_defaults(handler=_dandi_prep)

    _add_train_calcium(sub, common)

    worker = sub.add_parser(
        "worker", parents=[common], help="a Prefect worker that stops on one SIGTERM",
        description="Run `prefect worker start WORKER_ARGS...` (e.g. --pool nwbflow-cpu). The first SIGTERM or "
                    "SIGINT stops the worker and its flow runs at once; each run ends Crashed, is resubmitted and "
                    "resumes from its cached stages on another worker (deployments/README.md).")
    worker.add_argument("--pool", required=True, help="the work pool; other options (--name, --limit, ...) "
                                                      "go to `prefect worker start` as they are")
    worker.set_defaults(handler=_worker)

    automations = sub.add_parser(
        "service-automations", parents=[common], help="create or update the service's Prefect automations",
        description="Create, or update by name, the automations in FILE on the server of PREFECT_API_URL "
                    "(crashed-run detection from heartbeats; deployments/README.md).")
    automations.add_argument("--file", default="deployments/automations.yaml", metavar="FILE",
                             help="automations YAML (default: deployments/automations.yaml)")
    automations.set_defaults(handler=_service_automations)

    demo = sub.add_parser("demo", parents=[common], help="synthesize a session, process it, print a report",
                          description="Build a small synthetic session, run process_session on CPU on the "
                                      "embedded Prefect server, validate the output, print stage timings.")
    demo.add_argument("--out-dir", default="nwbflow-demo", help="where the demo files go")
    demo.set_defaults(handler=_demo)
    return parser


def _run(args: argparse.Namespace) -> int:
    from nwbflow.flows.session import check_output, process_session
    from nwbflow.params import load_session_params
    from nwbflow.report import stage_table
    from nwbflow.tasks.plan import check_input

    stages = None if args.stages is None else [s.strip() for s in args.stages.split(",") if s.strip()]
    params = load_session_params(args.params, stages=stages, device=args.device)
    input_path = Path(args.input)
    check_input(input_path, params)  # bad input fails here, before Prefect starts
    check_output(input_path, args.output)
    try:
        summary = process_session(str(input_path), args.output, params, args.workdir)
    except PartialResultsError as exc:
        print(stage_table(exc.summary))
        print(f"nwbflow: partial: {exc}", file=sys.stderr)
        return EXIT_PARTIAL
    print(stage_table(summary))
    return EXIT_OK


def _nightly(args: argparse.Namespace) -> int:
    from nwbflow.flows.nightly import data_root, nightly
    from nwbflow.params import load_session_params

    params = load_session_params(args.params)
    data_root(args.root)  # bad input fails here, before Prefect starts
    outcome = nightly(args.root, args.out, params, args.workdir)
    print(f"processed {len(outcome['processed'])}, skipped {len(outcome['skipped'])} (unchanged), "
          f"busy {len(outcome['busy'])} (being processed by another run)")
    return EXIT_OK


def _dandi_prep(args: argparse.Namespace) -> int:
    from nwbflow.flows.dandi import UploadBlockedError, check_dandi_prep_inputs, dandi_prep

    root, out, _meta = check_dandi_prep_inputs(args.root, args.out, args.metadata)  # before Prefect starts
    metadata = None if args.metadata is None else str(Path(args.metadata).resolve())
    try:
        report = dandi_prep(str(root), str(out), metadata, "copy" if args.copy else "hardlink")
    except UploadBlockedError as exc:
        report = json.loads(Path(exc.report_path).read_text())
        print(_dandi_summary(report))
        print(f"nwbflow: blocked: {exc}", file=sys.stderr)
        return EXIT_BLOCKED
    print(_dandi_summary(report))
    return EXIT_OK


def _dandi_summary(report: dict) -> str:
    """A table of the files (status, DANDI path), each blocker's fix under it, the notes, the report's path."""
    from nwbflow.report import format_table

    rows = [[a["relative"], a["kind"], a["status"], a["target"] or "-"] for a in report["assets"]]
    lines = [format_table(["file", "kind", "status", "DANDI path"], rows)]
    for asset in report["assets"]:
        if asset["blockers"]:
            lines.append(f"\n{asset['relative']} is blocked:")
            lines += [f"  - [{b['check']}] fix: {b['fix']}" for b in asset["blockers"]]
    lines += [f"note: {note}" for note in report["notes"]]
    lines.append(f"report: {Path(report['dandiset_dir']) / '.nwbflow-dandi-prep' / 'report.md'} (and report.json)")
    return "\n".join(lines)


def _add_train_calcium(sub, common: argparse.ArgumentParser) -> None:
    from nwbflow.ophys.training.cli import add_arguments

    train = sub.add_parser("train-calcium", parents=[common], help="train the calcium spike-inference CNN",
                           description="Train the calcium CNN from simulation and CASCADE-format ground truth "
                                       "(DS09/DS14, the Spikefinder sources, are never used); writes NAME.pt and "
                                       "NAME.json (checksum, command, seed, data provenance).")
    add_arguments(train)
    train.set_defaults(handler=_train_calcium)


def _train_calcium(args: argparse.Namespace) -> int:
    from nwbflow.ophys.training.cli import run

    logging.getLogger("nwbflow").setLevel(logging.INFO)
    logging.getLogger("nwbflow").addHandler(logging.StreamHandler())
    card = run(args)
    print(f"wrote {card['name']}: {card['weights_bytes']} bytes, sha256 {card['weights_sha256']}")
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    from nwbflow.service import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s - %(message)s")
    return run_worker(["--pool", args.pool, *args.worker_args])


def _service_automations(args: argparse.Namespace) -> int:
    from nwbflow.service import apply_automations

    for name, what in apply_automations(args.file):
        print(f"{what} automation {name}")
    return EXIT_OK


def _synth(args: argparse.Namespace) -> int:
    from nwbflow.synth import SynthConfig, write_synthetic_session

    config = SynthConfig(duration_s=args.duration_s, num_channels=args.num_channels, num_units=args.num_units,
                         num_rois=args.num_rois, drift=args.drift, ephys=not args.no_ephys,
                         ophys=not args.no_ophys, seed=args.seed, adc_shifts=args.adc_shifts,
                         common_noise_uv=args.common_noise_uv, dead_channels=tuple(args.dead_channels),
                         noisy_channels=tuple(args.noisy_channels), outside_channels=args.outside_channels,
                         saturation_events=args.saturation_events, saturation_rail_uv=args.saturation_rail_uv,
                         shanks=args.shanks)
    write_synthetic_session(args.output, config, overwrite=args.overwrite)
    print(f"wrote {args.output} (ground truth in sidecar files beside it)")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from nwbflow.demo import run_demo

    return EXIT_OK if run_demo(Path(args.out_dir)) else EXIT_FAILURE


class _DropTraceback(logging.Filter):
    """Keep the message of a logged failure, drop its traceback (shown with --debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _hide_tracebacks() -> None:
    # On the loggers, not their handlers: Prefect attaches its handlers only when a flow starts.
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_DropTraceback())


if __name__ == "__main__":
    sys.exit(main())
