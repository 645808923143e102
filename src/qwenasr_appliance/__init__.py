"""qwenasr-appliance: an OpenAI-compatible speech-to-text server for Qwen3-ASR."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qwenasr-appliance")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
