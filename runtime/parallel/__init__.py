"""Multi-device sampling: one video's tokens (and its CFG passes) spread over several ranks."""
from .config import ParallelConfig
from .worker import ModelSpec, is_torchrun_worker, worker_main
from .worker_group import WorkerGroupError, active_group, sample_parallel, unload

__all__ = [
    "ModelSpec",
    "ParallelConfig",
    "WorkerGroupError",
    "active_group",
    "is_torchrun_worker",
    "sample_parallel",
    "unload",
    "worker_main",
]
