"""Tiers become plans: the denoiser's units and their bytes (units, sizes), where each is stored
(placement), the memory and time models (memory, timing), the search for the fastest placement
that fits a budget (search) and the plan itself (planner). All pure functions of sizes and a device."""

from core.plan.memory import PassShape
from core.plan.placement import Placement, Store
from core.plan.planner import JobShape, Plan, keep_placement, plan_for, step_down
from core.plan.sizes import ModelSizes

__all__ = [
    "JobShape",
    "ModelSizes",
    "PassShape",
    "Placement",
    "Plan",
    "Store",
    "keep_placement",
    "plan_for",
    "step_down",
]
