"""What cache-dit did during one job, counted per expert and per CFG branch.

A "call" is one transformer forward (a step runs one per CFG branch). A cached call still runs
the first `fn` and last `bn` blocks; only the middle ones are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EXPERT_NAMES = ("high-noise", "low-noise")


@dataclass
class BranchStats:
    branch: str
    """"cond" or "uncond" (the negative-prompt pass)."""
    calls: int
    cached_steps: list[int]
    """Job step indices (0 = the job's first step) whose call was served from the cache."""

    @property
    def cached_calls(self) -> int:
        return len(self.cached_steps)


@dataclass
class ExpertStats:
    expert: int
    """0: `transformer` (the only one, or Wan2.2's high-noise expert); 1: `transformer_2`."""
    first_step: int
    steps: int
    num_blocks: int
    blocks_per_cached_call: int
    """fn + bn."""
    branches: list[BranchStats]
    scm_mask: list[int] | None = None
    """Steps computation mask used (1 = must compute), in this expert's own step numbering."""

    @property
    def calls(self) -> int:
        return sum(b.calls for b in self.branches)

    @property
    def cached_calls(self) -> int:
        return sum(b.cached_calls for b in self.branches)

    @property
    def computed_calls(self) -> int:
        return self.calls - self.cached_calls

    @property
    def blocks_total(self) -> int:
        return self.calls * self.num_blocks

    @property
    def blocks_computed(self) -> int:
        return self.computed_calls * self.num_blocks + self.cached_calls * self.blocks_per_cached_call


@dataclass
class CacheStats:
    enabled: bool = False
    experts: list[ExpertStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Why something was switched off (e.g. SCM with too few steps)."""

    @property
    def calls(self) -> int:
        return sum(e.calls for e in self.experts)

    @property
    def cached_calls(self) -> int:
        return sum(e.cached_calls for e in self.experts)

    @property
    def computed_calls(self) -> int:
        return self.calls - self.cached_calls

    @property
    def blocks_total(self) -> int:
        return sum(e.blocks_total for e in self.experts)

    @property
    def blocks_computed(self) -> int:
        return sum(e.blocks_computed for e in self.experts)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able numbers for job results and the CLI summary."""
        return {
            "enabled": self.enabled,
            "calls": self.calls,
            "computed_calls": self.computed_calls,
            "cached_calls": self.cached_calls,
            "blocks_total": self.blocks_total,
            "blocks_computed": self.blocks_computed,
            "experts": [
                {
                    "expert": e.expert,
                    "first_step": e.first_step,
                    "steps": e.steps,
                    "num_blocks": e.num_blocks,
                    "calls": e.calls,
                    "cached_calls": e.cached_calls,
                    "blocks_computed": e.blocks_computed,
                    "scm_mask": e.scm_mask,
                    "branches": {
                        b.branch: {"calls": b.calls, "cached_steps": list(b.cached_steps)} for b in e.branches
                    },
                }
                for e in self.experts
            ],
            "notes": list(self.notes),
        }

    def summary_text(self) -> str:
        """One line for the node's UI text, e.g.
        "Cache-DiT: 36/60 transformer calls computed, 24 cached (1.67x fewer; 1.43x fewer block runs)"."""
        if not self.enabled:
            return "; ".join(["Cache-DiT: off", *self.notes])
        text = f"Cache-DiT: {self.computed_calls}/{self.calls} transformer calls computed, {self.cached_calls} cached"
        if self.computed_calls:
            text += (f" ({self.calls / self.computed_calls:.2f}x fewer;"
                     f" {self.blocks_total / self.blocks_computed:.2f}x fewer block runs)")
        if len(self.experts) > 1:
            text += "; " + ", ".join(
                f"{EXPERT_NAMES[e.expert]} {e.computed_calls}/{e.calls}" for e in self.experts
            )
        return "; ".join([text, *self.notes])
