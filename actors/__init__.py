"""Ray actors: the shard worker (one device, one sequence shard) and the group that runs them.

`ShardWorker` is a plain class and imports without Ray (GPU hosts may run it under
torch.multiprocessing); the group, which needs Ray, is imported on first use.
"""
from .worker import ShardWorker

_GROUP_NAMES = ("ActorGroup", "GroupConfig", "GroupSetupError")


def __getattr__(name):
    if name in _GROUP_NAMES:
        from . import group
        return getattr(group, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ActorGroup", "GroupConfig", "GroupSetupError", "ShardWorker"]
