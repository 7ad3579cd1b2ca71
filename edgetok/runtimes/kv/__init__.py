"""KV caches. Every cache implements the KVCache protocol; the model never knows which one it has."""

from edgetok.runtimes.kv.base import AttendingCache, GraphCache, KVCache, KVState, add_state
from edgetok.runtimes.kv.config import KVConfig
from edgetok.runtimes.kv.contiguous import ContiguousCache
from edgetok.runtimes.kv.tiered import TieredCache

add_state(ContiguousCache)
add_state(TieredCache)
__all__ = ["AttendingCache", "GraphCache", "KVCache", "KVState", "KVConfig", "ContiguousCache", "TieredCache"]
