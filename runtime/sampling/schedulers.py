"""Flow-matching schedulers for Wan, built from diffusers (one fresh instance per run: the
multistep solvers keep history between steps)."""
from __future__ import annotations

from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import InputValueError
from .request import SCHEDULERS

NUM_TRAIN_TIMESTEPS = 1000


def make_scheduler(name: str, shift: float) -> SchedulerMixin:
    """A scheduler in Wan's flow-matching setup with the given flow shift.

    "unipc" is what diffusers' WanPipeline ships (and the official Wan default); "dpm++" is
    DPM-Solver++(2M) on the same flow sigmas; "euler" is plain flow-matching Euler (distilled
    few-step LoRAs).
    """
    if shift <= 0:
        raise InputValueError(f"shift {shift} must be greater than 0", input_name="shift")
    if name == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            flow_shift=shift,
        )
    if name == "dpm++":
        return DPMSolverMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            flow_shift=shift,
            algorithm_type="dpmsolver++",
            solver_order=2,
        )
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    raise InputValueError(
        f"unknown scheduler '{name}' (choose one of {', '.join(SCHEDULERS)})", input_name="scheduler"
    )
