"""KV caches. Every cache implements the KVCache protocol; the model never knows which one it has."""

from edgetok.runtimes.kv.base import KVCache
from edgetok.runtimes.kv.contiguous import ContiguousCache

__all__ = ["KVCache", "ContiguousCache"]
