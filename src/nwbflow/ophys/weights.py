"""Trained networks shipped in the package: ``ophys/weights/<name>.pt`` + ``<name>.json``.

The JSON ("model card") holds the architecture, the SHA-256 of the ``.pt``
file, the training command, seed, torch version and the provenance of every
dataset used. Loading verifies the checksum of the very bytes it
deserializes; nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from nwbflow.errors import BadInputError, NwbflowError
from nwbflow.ophys.model import CnnSpec, SpikeCnn
from nwbflow.params import CALCIUM_MODEL

log = logging.getLogger(__name__)

#: The network ``CalciumParams.model`` names by default.
DEFAULT_MODEL = CALCIUM_MODEL


class WeightsChecksumError(NwbflowError):
    """A weights file does not match the checksum in its model card (corrupt or replaced)."""


@dataclass(frozen=True)
class LoadedCnn:
    """A network ready for inference, with its card and the verified checksum of its weights."""

    name: str
    model: SpikeCnn
    spec: CnnSpec
    sha256: str
    card: dict


def shipped_directory() -> Path:
    """The package folder holding the shipped weights."""
    return Path(str(resources.files("nwbflow.ophys") / "weights"))


def available_models(directory: str | Path | None = None) -> list[str]:
    """Names of the networks in ``directory`` (default: the shipped ones)."""
    folder = Path(directory) if directory is not None else shipped_directory()
    return sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".pt").is_file())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_checksum(name: str = DEFAULT_MODEL, directory: str | Path | None = None) -> str:
    """The verified SHA-256 of a network's weights (what a result computed with it depends on).

    Raises as :func:`load_cnn`.
    """
    return _verified(name, directory)[2]


def _verified(name: str, directory: str | Path | None) -> tuple[dict, bytes, str]:
    """(card, weights bytes, their SHA-256), checked against each other."""
    folder = Path(directory) if directory is not None else shipped_directory()
    card_path, weights_path = folder / f"{name}.json", folder / f"{name}.pt"
    if not (card_path.is_file() and weights_path.is_file()):
        raise BadInputError(f"no calcium model named {name!r} (looked for {weights_path} and its .json card)",
                            fix=f"choose among {', '.join(available_models(folder)) or 'none found'}")
    card = json.loads(card_path.read_text())
    data = weights_path.read_bytes()
    actual = sha256_bytes(data)
    if actual != card["weights_sha256"]:
        raise WeightsChecksumError(
            f"{weights_path}: SHA-256 {actual} differs from {card['weights_sha256']} recorded in {card_path.name}; "
            "the weights file is corrupt or was replaced. Fix: reinstall nwbflow, or retrain with "
            "`nwbflow train-calcium` which writes both files together")
    return card, data, actual


def load_cnn(name: str = DEFAULT_MODEL, directory: str | Path | None = None,
             device: torch.device | str = "cpu") -> LoadedCnn:
    """Load a trained network, verifying its weights' SHA-256 against its card.

    Raises
    ------
    BadInputError
        No network of that name.
    WeightsChecksumError
        The weights file's SHA-256 differs from the card's (corrupt or replaced file).
    """
    card, data, actual = _verified(name, directory)
    spec = CnnSpec.from_dict(card["spec"])
    model = SpikeCnn(spec)
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    model.eval().to(device)
    log.info("calcium model %s loaded (sha256 %s)", name, actual[:12])
    return LoadedCnn(name=name, model=model, spec=spec, sha256=actual, card=card)


def save_cnn(model: SpikeCnn, directory: str | Path, name: str, card: dict) -> dict:
    """Write ``<name>.pt`` (the state dict) and ``<name>.json`` (``card`` + spec + checksum); return the card."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    data = buffer.getvalue()
    full = {**card, "name": name, "spec": model.spec.as_dict(), "weights_file": f"{name}.pt",
            "weights_sha256": sha256_bytes(data), "weights_bytes": len(data)}
    (folder / f"{name}.pt").write_bytes(data)
    (folder / f"{name}.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full
