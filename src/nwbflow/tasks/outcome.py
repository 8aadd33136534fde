"""What a stage task hands back to the flow: small, picklable, no arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

from nwbflow.nwb_io.provenance import ProvenanceRecord


@dataclass(frozen=True)
class StageOutcome:
    """A finished stage: its cache key, timing, artifacts (name -> path), counts, provenance row."""

    stage: str
    key: str
    seconds: float
    provenance: ProvenanceRecord
    artifacts: dict[str, str] = field(default_factory=dict)
    summary: dict[str, float | int | str] = field(default_factory=dict)
