"""The work directory's large scratch binaries: which stage reads which, and dropping what nothing reads.

Per recording-hour at 384 channels, float16: the preprocessed binary and the motion-corrected one are
~83 GB each. Once a series' stages have all run, the preprocessed binary is deleted when the motion stage
wrote a corrected one (the sorter reads that; peaks and motion, which read the preprocessed one, are done),
unless ``execution.keep_preprocessed_binary``. Its stage stays complete (its record, offsets and whitening
matrix are kept and later runs reuse them); only a later run that must compute a stage reading that binary
(peaks or motion with other parameters) computes the preprocess stage again first.

Deleting and reading are serialized by the preprocess directory's lock: a stage that reads an upstream
binary runs holding that upstream directory's lock, so two runs of one input never lose a binary in use.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from nwbflow.locks import directory_lock
from nwbflow.tasks.caching import DONE_MARKER
from nwbflow.tasks.runner import StageOutcome

log = logging.getLogger(__name__)

#: The binary artifact of each stage that writes one.
BINARY_ARTIFACT = {"preprocess": "preprocessed", "motion": "corrected"}


def binary_sources(stage: str, upstream: dict[str, StageOutcome]) -> list[str]:
    """The upstream stages whose binary ``stage`` reads when it computes."""
    if stage in ("peaks", "motion"):
        return ["preprocess"] if "preprocess" in upstream else []
    if stage == "sorting":
        if "motion" in upstream and BINARY_ARTIFACT["motion"] in upstream["motion"].artifacts:
            return ["motion"]
        return ["preprocess"] if "preprocess" in upstream else []
    return []


def binary_present(outcome: StageOutcome) -> bool:
    """Whether the stage's binary is on disk (a stage without one: True)."""
    name = BINARY_ARTIFACT.get(outcome.stage)
    return name is None or name not in outcome.artifacts or Path(outcome.artifacts[name]).is_file()


def forget(outcome: StageOutcome) -> None:
    """Mark a stage whose binary is gone as not done, so that the next run of it computes it again."""
    with directory_lock(outcome.directory):
        if not binary_present(outcome):
            (Path(outcome.directory) / DONE_MARKER).unlink(missing_ok=True)


def holding(outcomes: list[StageOutcome]) -> ExitStack:
    """The locks of the given stages' directories, held for a ``with`` block (in stage order)."""
    stack = ExitStack()
    for outcome in outcomes:
        stack.enter_context(directory_lock(outcome.directory))
    return stack


def release_unread(done: dict[str, StageOutcome]) -> int:
    """Delete the preprocessed binary when the motion stage wrote a corrected one; returns the bytes freed."""
    preprocess, motion = done.get("preprocess"), done.get("motion")
    if preprocess is None or motion is None or BINARY_ARTIFACT["motion"] not in motion.artifacts:
        return 0
    binary = Path(preprocess.artifacts.get(BINARY_ARTIFACT["preprocess"], ""))
    with directory_lock(preprocess.directory):
        if not binary.is_file():
            return 0
        size = binary.stat().st_size
        binary.unlink()
    log.info("deleted %s (%.1f GB): the sorter reads the motion-corrected binary", binary, size / 1e9)
    return size
