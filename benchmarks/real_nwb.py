"""nwbflow on real public NWB files from other writers (AqNWB, MatNWB, NeuroConv, CaImAn/optinist, pynwb 1.x-2.x).

The files are not in this repository (they belong to their projects; see RESULTS.md): ``real_nwb_files.json``
names each one (repository, commit, path, git blob id, licence), the exit code ``nwbflow run`` should give
with default parameters and why. Get them with git, e.g. for each entry

    git -C CLONES/<owner>+<name> show <commit>:<path> > DATA/<owner>+<name>/<path>

(``--extract-from CLONES`` does that for every entry whose clone is there). Then

    .venv/bin/python benchmarks/real_nwb.py --data DATA --out benchmarks/results/real_nwb.json

runs ``nwbflow run IN -o OUT`` on each file (one process each, defaults, CPU), and records the exit code,
seconds, whether the input is byte-identical afterwards, host paths in the output, and findings of pynwb,
nwbinspector and dandi that the output has and the input has not. Prints a table; exits 1 when any file
gives another exit code than expected, changes, or gets a finding or a host path added.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from nwbflow.nwb_io._hdf5 import text_values
from nwbflow.nwb_io.validate import validate_file
from nwbflow.report import format_table

MANIFEST = Path(__file__).with_name("real_nwb_files.json")


def git_blob_id(path: Path) -> str:
    """The id git gives ``path``'s content (sha1 of "blob <size>\\0" + bytes)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def local_path(data: Path, entry: dict) -> Path:
    return data / entry["repo"].replace("/", "+") / entry["path"]


def extract(entry: dict, clones: Path, target: Path) -> None:
    """Write ``entry``'s file from its clone under ``clones`` (a plain clone or a bare ``repo`` inside it)."""
    for git_dir in (clones / entry["repo"].replace("/", "+"), clones / entry["repo"].replace("/", "+") / "repo"):
        if git_dir.exists():
            shown = subprocess.run(["git", "-C", str(git_dir), "show", f"{entry['commit']}:{entry['path']}"],
                                   capture_output=True, check=False)
            if shown.returncode == 0:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(shown.stdout)
                return


def host_paths(path: Path, roots: tuple[str, ...]) -> list[str]:
    """Text values of the HDF5 file (datasets and attributes) that hold one of ``roots``."""
    return [value for value in text_values(path) if any(root in value for root in roots)]


def run_one(entry: dict, source: Path, scratch: Path) -> dict:
    out = scratch / f"{source.stem}_processed.nwb"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    clock = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("nwbflow")), "run", str(source), "-o", str(out),
                           "--device", "cpu", "--workdir", str(scratch / "work")],
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, PREFECT_HOME=str(scratch / "prefect")))
    row = {"file": f"{entry['repo']}:{entry['path']}", "writer": entry["writer"], "exit": done.returncode,
           "expect_exit": entry["expect_exit"], "seconds": time.perf_counter() - clock,
           "input_unchanged": hashlib.sha256(source.read_bytes()).hexdigest() == before,
           "message": next((line.replace(str(source), source.name) for line in reversed(done.stderr.splitlines())
                            if line.startswith("nwbflow:")), ""),
           "host_paths": [], "introduced": [], "output_bytes": 0}
    if out.exists():
        row["output_bytes"] = out.stat().st_size
        row["host_paths"] = host_paths(out, (str(source.parent), str(scratch), "/home/", "/tmp/"))
        introduced = validate_file(out).introduced_over(validate_file(source))
        row["introduced"] = [f"{f.location}: {f.message[:200]}" for f in introduced]
    row["ok"] = (row["exit"] == row["expect_exit"] and row["input_unchanged"] and not row["host_paths"]
                 and not row["introduced"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of <owner>+<name>/<path> files")
    parser.add_argument("--extract-from", type=Path, help="folder of git clones named <owner>+<name>")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/real_nwb.json"))
    args = parser.parse_args()
    rows, missing = [], []
    for entry in json.loads(MANIFEST.read_text()):
        source = local_path(args.data, entry)
        if not source.exists() and args.extract_from:
            extract(entry, args.extract_from, source)
        if not source.exists() or git_blob_id(source) != entry["blob"]:
            missing.append(f"{entry['repo']}:{entry['path']}@{entry['commit'][:10]}")
            continue
        with tempfile.TemporaryDirectory() as scratch:
            rows.append(run_one(entry, source, Path(scratch)))
    print(format_table(["file", "exit (expected)", "s", "input same", "added findings / host paths", "message"],
                       [[r["file"].split(":")[1].rsplit("/", 1)[-1], f"{r['exit']} ({r['expect_exit']})",
                         f"{r['seconds']:.0f}", "yes" if r["input_unchanged"] else "NO",
                         f"{len(r['introduced'])} / {len(r['host_paths'])}", r["message"][:110]] for r in rows]))
    if missing:
        print(f"not found or not the recorded version ({len(missing)}): {', '.join(missing)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "missing": missing}, indent=2))
    failed = [r["file"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} as expected" + (f"; not: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
