"""metaemu: the GCE/GKE metadata server for workloads outside Google Cloud."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metaemu")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
