"""nwbflow: Prefect-orchestrated processing of NWB sessions with provenance."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nwbflow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
