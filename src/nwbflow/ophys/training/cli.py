"""Arguments of ``nwbflow train-calcium`` (light: torch is imported only when training runs)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from nwbflow.params import CALCIUM_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", metavar="DATA_DIR", help="local copy of GT_autocalibration/ "
                                                             "(github.com/PTRRupprecht/Autocalibrated-spike-inference)")
    parser.add_argument("--out", default=None, help="folder for <name>.pt/.json (default: the package's weights)")
    parser.add_argument("--name", default=CALCIUM_MODEL, help="model name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=16000, help="optimizer steps")


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` say; the card records the equivalent ``nwbflow train-calcium`` command."""
    from nwbflow.ophys.training.command import train
    from nwbflow.ophys.weights import shipped_directory

    command = "nwbflow train-calcium " + " ".join(shlex.quote(a) for a in (
        [str(args.data_dir)] + ([f"--out={args.out}"] if args.out else []) +
        [f"--name={args.name}", f"--seed={args.seed}", f"--steps={args.steps}"]))
    out = Path(args.out) if args.out else shipped_directory()
    return train(args.data_dir, out, args.name, seed=args.seed, steps=args.steps, command=command)
