"""Sequence parallelism: layouts, transports, the ring schedule, driver-side entry point.

Nothing here imports Ray; the actor group lives in ringserve.actors.
"""
from .distributed import distributed_attention
from .layout import LAYOUTS, SCHEDULES, Shard, gather, shard, shards, split
from .ring import RingPlan, RingStats, Step, block_visible, plan_ring, ring_attention
from .transport import (DEFAULT_TIMEOUT_S, GlooTransport, Handle, NcclTransport, ThreadHub,
                        ThreadTransport, Transport, TransportError, TransportSpec,
                        TransportTimeoutError, make_store, nccl_unique_id)

__all__ = ["distributed_attention", "LAYOUTS", "SCHEDULES", "Shard", "gather", "shard", "shards", "split",
           "RingPlan", "RingStats", "Step", "block_visible", "plan_ring", "ring_attention",
           "DEFAULT_TIMEOUT_S", "GlooTransport", "Handle", "NcclTransport", "ThreadHub",
           "ThreadTransport", "Transport", "TransportError", "TransportSpec",
           "TransportTimeoutError", "make_store", "nccl_unique_id"]
