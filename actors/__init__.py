"""Ray actors: the shard worker (one device, one sequence shard) and the group that runs them.

`ShardWorker` is a plain class and imports without Ray (GPU hosts may run it under
torch.multiprocessing); so does `LocalGroup` (one worker in this process: `LLM(in_process=
True)`); the actor group, which needs Ray, is imported on first use.
"""
from .errors import GroupSetupError
from .local_group import LocalGroup
from .worker import ShardWorker

_GROUP_NAMES = ("ActorGroup", "GroupConfig")


def __getattr__(name):
    if name in _GROUP_NAMES:
        from . import group
        return getattr(group, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ActorGroup", "GroupConfig", "GroupSetupError", "LocalGroup", "ShardWorker"]
