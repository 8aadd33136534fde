"""nwbflow: Prefect-orchestrated processing of NWB sessions with provenance."""

from importlib.metadata import PackageNotFoundError, version

from nwbflow.cpu_threads import settle_openmp_waiting

settle_openmp_waiting()  # before anything imports torch (libgomp reads it once, when loaded)

try:
    __version__ = version("nwbflow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
