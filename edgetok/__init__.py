"""edgetok: take a language model to the edge and run it there."""

from edgetok.api import Model, load
from edgetok.errors import EdgetokError
from edgetok.runtimes.engine import GenerationConfig, Result
from edgetok.runtimes.kv import KVConfig
from edgetok.version import __version__

__all__ = ["load", "Model", "GenerationConfig", "KVConfig", "Result", "EdgetokError", "__version__"]
