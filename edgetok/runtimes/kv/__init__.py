"""KV caches. Every cache implements the KVCache protocol; the model never knows which one it has."""

from edgetok.runtimes.kv.base import KVCache
from edgetok.runtimes.kv.config import KVConfig
from edgetok.runtimes.kv.contiguous import ContiguousCache
from edgetok.runtimes.kv.tiered import TieredCache

__all__ = ["KVCache", "KVConfig", "ContiguousCache", "TieredCache"]
