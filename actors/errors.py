"""Errors of the worker groups (no Ray import: the in-process group raises them too)."""


class GroupSetupError(RuntimeError):
    """The group could not be created (resources missing, an actor failed to start or join),
    or it was called while it had no workers (shut down, or its last start failed)."""
