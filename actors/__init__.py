"""Ray actors: the shard worker (one device, one sequence shard) and the group that runs them."""
from .group import ActorGroup, GroupConfig, GroupSetupError
from .worker import ShardWorker

__all__ = ["ActorGroup", "GroupConfig", "GroupSetupError", "ShardWorker"]
