"""Tiers become plans: the denoiser's units and their bytes, the memory and time models, and the
search for the fastest placement that fits a budget (all pure functions of sizes and a device)."""

from core.plan.planner import JobShape, ModelSizes, Plan, keep_placement, plan_for, step_down

__all__ = ["JobShape", "ModelSizes", "Plan", "keep_placement", "plan_for", "step_down"]
