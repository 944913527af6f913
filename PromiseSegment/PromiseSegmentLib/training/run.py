"""One training run as users start it (command line, Slicer, console): the recipe's configuration for the
data, the plan with its estimate on this machine, said before any work, the time budget, then training."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List, Optional

from PromiseSegmentLib.callbacks import CancelFn
from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.inference.engine import InferenceEngine
from PromiseSegmentLib.training.config import TrainConfig
from PromiseSegmentLib.training.rates import measure_rates
from PromiseSegmentLib.training.recipe import RunOptions, TrainPlan, fit_to_budget
from PromiseSegmentLib.training.records import TrainProgress, TrainResult
from PromiseSegmentLib.training.trainer import train_adapter


def plan_for(
    engine: InferenceEngine,
    train: List[Case],
    select: List[Case],
    options: RunOptions,
    config: Optional[TrainConfig] = None,
    budget_s: Optional[float] = None,
) -> tuple:
    """(plan, rates): the run's plan scaled to ``budget_s`` seconds from when the plan is made, and this
    machine's measured rates. ``config`` (an interrupted run's, or one given in full) replaces the recipe and
    is not rescaled."""
    box_apm = "box" in engine.spec.apm_prompts and options.overrides.get("use_apm", True)
    cfg = config or options.config(len(train), box_apm)
    cfg.check()
    measured = time.monotonic()
    rates = measure_rates(engine, cfg, train[0])
    plan = TrainPlan(options.recipe if config is None else "as given", cfg, len(train), len(select), box_apm)
    if budget_s and config is None:
        plan = fit_to_budget(plan, rates, budget_s - (time.monotonic() - measured))
    return plan, rates


def run_training(
    engine: InferenceEngine,
    train: List[Case],
    select: List[Case],
    options: RunOptions,
    output: Optional[Path] = None,
    resume: bool = False,
    progress: Optional[TrainProgress] = None,
    cancel: Optional[CancelFn] = None,
    say: Callable[[str], None] = print,
    config: Optional[TrainConfig] = None,
    started: Optional[float] = None,
) -> TrainResult:
    """Plan (said through ``say``), then train with the budget's deadline. The budget counts from
    ``started`` (``time.monotonic()``: when the user started the run, before loading its data), else now."""
    started = time.monotonic() if started is None else started
    say("measuring this machine's training speed for the plan (a few seconds) ...")
    budget = options.budget_minutes(given=config is not None)
    end = started + budget * 60 if budget else None
    plan, rates = plan_for(engine, train, select, options, config, None if end is None else end - time.monotonic())
    say("\n".join(plan.describe(rates, engine.backbone.name)))
    # The epochs stop early enough for the box refinement's choice after them; a shortened warm-up leaves a joint epoch.
    deadline = None if end is None else end - plan.phase_seconds(rates)["choose"]
    if budget:
        why = "" if options.time_budget_min else " (the auto recipe's; --time-budget gives another)"
        say(f"  time budget {budget:g} min{why}: training stops there with the best adapter so far")
    folder = Path(options.feature_cache) if options.feature_cache else None
    joint = plan.joint_epoch_seconds(rates)
    return train_adapter(engine, train, select, plan.config, output, resume, progress, cancel, folder, deadline, joint)
