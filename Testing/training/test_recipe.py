"""Training recipes and plans: defaults from the data size, the printed plan and its estimate, the time budget."""

import subprocess
import sys

import pytest

from PromiseSegmentLib.training.config import first_scored_warmup_epoch
from PromiseSegmentLib.training.recipe import (
    MachineRates,
    TrainPlan,
    fit_to_budget,
    recipe_config,
    selection_count,
    split_for_selection,
)

RATES = MachineRates(encode=0.5, warmup_step=0.05, joint_step=0.25, evaluate=0.1, where="2 CPU threads")


def test_the_auto_recipe_follows_the_data_size_and_the_backbone():
    few, many = recipe_config("auto", 15), recipe_config("auto", 700)
    assert few.cache_features and not few.augment and few.augmented_copies == 0  # measured best on a few slices
    assert few.user_box_share == 0 and few.apm_joint_lr == 1  # the APM learns on from its own boxes
    assert few.epochs - few.apm_warmup_epochs > many.epochs - many.apm_warmup_epochs and few.epochs > many.epochs
    assert many.apm_joint_lr == 0 and 0 < many.user_box_share < 1  # IPS also serves the user's box
    points = recipe_config("auto", 700, box_apm=False)
    assert points.apm_warmup_epochs == 0 and points.user_box_share == 0  # no box APM: no warm-up, no boxes
    for cfg in (few, many, points):
        cfg.check()


def test_the_paper_recipe_is_prompts_schedule_and_options_override_any_recipe():
    paper = recipe_config("paper", 700)
    assert (paper.epochs, paper.lr, paper.augment, paper.cache_features) == (200, 1e-5, True, False)
    mine = recipe_config("auto", 700, lr=3e-4, augmented_copies=1)
    assert mine.lr == 3e-4 and mine.augmented_copies == 1
    short = recipe_config("auto", 15, epochs=13)
    assert short.epochs == 13 and 0 < short.apm_warmup_epochs < 13  # the warm-up keeps its share
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_config("fast", 10)


def test_the_plan_counts_every_encode_and_says_what_each_phase_costs():
    cfg = recipe_config("auto", 630, augmented_copies=4)
    plan = TrainPlan("auto", cfg, 630, 70)
    assert plan.encodes() == 630 * 5 + 70
    seconds = plan.phase_seconds(RATES)
    assert seconds["encode"] == pytest.approx(plan.encodes() * 0.5)
    scored = cfg.apm_warmup_epochs - first_scored_warmup_epoch(cfg)  # the best warm-up epoch is chosen on them
    assert 0 < scored < cfg.apm_warmup_epochs
    assert seconds["apm warm-up"] == pytest.approx(cfg.apm_warmup_epochs * 630 * 0.05 + scored * 70 * 0.1)
    lines = plan.describe(RATES, "lite_medsam")
    assert "630 x 5 versions + 70 = 3,220 images" in lines[1]
    assert lines[-1].startswith("  about ") and "2 CPU threads" in lines[-1]
    online = TrainPlan("paper", recipe_config("paper", 630), 630, 70)
    assert online.encodes() == 630 * 200 + 70  # on-line augmentation encodes at every step


def test_a_time_budget_drops_copies_first_then_epochs_and_keeps_one_of_each():
    plan = TrainPlan("auto", recipe_config("auto", 630, augmented_copies=4), 630, 70)
    total = sum(plan.phase_seconds(RATES).values())
    assert fit_to_budget(plan, RATES, total + 1) == plan  # fits: unchanged
    fitted = fit_to_budget(plan, RATES, 1800)
    assert sum(fitted.phase_seconds(RATES).values()) <= 1800 * 1.01
    assert fitted.config.augmented_copies == 0
    tiny = fit_to_budget(plan, RATES, 1).config
    assert tiny.apm_warmup_epochs >= 1 and tiny.epochs - tiny.apm_warmup_epochs >= 1


def test_the_selection_split_is_seeded_and_never_empty():
    cases = list(range(50))
    train, select = split_for_selection(cases, None, 3)
    assert len(select) == 10 and sorted(train + select) == cases  # a fifth: fewer than 100 images
    assert split_for_selection(cases, None, 3) == (train, select)
    assert selection_count(1, None) == 1 and selection_count(2, 0.1) == 1
    assert selection_count(15, None) == 3 and selection_count(700, None) == 70  # a fifth of a few, a tenth of many


def test_the_recipe_needs_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from PromiseSegmentLib.training.recipe import recipe_config, TrainPlan\n"
        "recipe_config('auto', 100).check()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_run_speaks_before_it_spends_seconds_measuring_the_machine(tiny_backbone, spleen_cases, monkeypatch):
    """The first line of a training run comes before the rate measurement (seconds of encodes and steps),
    so a user sees at once that it started."""
    from PromiseSegmentLib.model.promise import engine_for
    from PromiseSegmentLib.training import run

    said = []

    class Measured(Exception):
        pass

    def measure_rates(*args):
        assert said and "measuring" in said[0]
        raise Measured()

    monkeypatch.setattr(run, "measure_rates", measure_rates)
    engine = engine_for(tiny_backbone, None, "cpu")
    with pytest.raises(Measured):
        run.run_training(engine, spleen_cases[:3], spleen_cases[3:4], run.RunOptions(), say=said.append)


def test_the_auto_recipe_fits_half_an_hour_unless_the_user_sets_the_schedule_or_a_budget():
    from PromiseSegmentLib.training.recipe import AUTO_BUDGET_MIN, RunOptions

    assert RunOptions().budget_minutes() == AUTO_BUDGET_MIN == 30
    assert RunOptions(time_budget_min=90).budget_minutes() == 90
    assert RunOptions(overrides={"lr": 1e-4}).budget_minutes() == 30  # a rate is not a schedule
    for schedule in ({"epochs": 80}, {"apm_warmup_epochs": 10}, {"augmented_copies": 4}):
        assert RunOptions(overrides=schedule).budget_minutes() is None  # the user's own schedule runs whole
    assert RunOptions(recipe="paper").budget_minutes() is None
    assert RunOptions().budget_minutes(given=True) is None  # an interrupted run's own schedule runs whole ...
    assert RunOptions(time_budget_min=5).budget_minutes(given=True) == 5  # ... unless the user gave a budget
    slow = MachineRates(encode=1.0, warmup_step=0.1, joint_step=0.5, evaluate=0.2, where="2 CPU threads")
    plan = TrainPlan("auto", recipe_config("auto", 630), 630, 70)
    fitted = fit_to_budget(plan, slow, RunOptions().budget_minutes() * 60)
    assert sum(fitted.phase_seconds(slow).values()) <= 30 * 60 * 1.01 < sum(plan.phase_seconds(slow).values())


def test_the_plan_counts_the_box_choice_after_the_epochs_and_the_budget_leaves_room_for_it():
    from PromiseSegmentLib.training.recipe import CHOICE_DECODES

    plan = TrainPlan("auto", recipe_config("auto", 630), 630, 70)
    assert plan.phase_seconds(RATES)["choose"] == pytest.approx(70 * 0.1 * CHOICE_DECODES)
    assert any("chosen on the 70 selection images" in line for line in plan.describe(RATES, "lite_medsam"))
    points = TrainPlan("auto", recipe_config("auto", 630, box_apm=False), 630, 70, box_apm=False)
    assert points.phase_seconds(RATES)["choose"] == 0  # nothing to choose without a box APM
    assert not any("chosen on" in line for line in points.describe(RATES, "sam_vit_b"))
    budget = sum(plan.phase_seconds(RATES).values()) * 0.7
    fitted = fit_to_budget(plan, RATES, budget)
    assert sum(fitted.phase_seconds(RATES).values()) <= budget * 1.01  # the choice included
    assert fitted.joint_epoch_seconds(RATES) == pytest.approx(plan.joint_epoch_seconds(RATES))


def test_the_budget_counts_from_when_the_user_started_the_run(tiny_backbone, spleen_cases, monkeypatch):
    """Loading the data before ``run_training`` is part of the user's budget: a run that starts with its
    budget nearly spent gets the smallest plan, and a deadline before the box choice."""
    import time

    from PromiseSegmentLib.model.promise import engine_for
    from PromiseSegmentLib.training import run

    seen = {}

    def train_adapter(engine, train, select, cfg, output, resume, progress, cancel, folder, deadline, joint):
        seen.update(cfg=cfg, deadline=deadline, joint=joint)
        raise StopIteration

    monkeypatch.setattr(run, "train_adapter", train_adapter)
    engine = engine_for(tiny_backbone, None, "cpu")
    options = run.RunOptions(time_budget_min=10)
    long_ago = time.monotonic() - 10 * 60 + 1
    with pytest.raises(StopIteration):
        run.run_training(engine, spleen_cases[:3], spleen_cases[3:4], options, say=lambda t: None, started=long_ago)
    cfg = seen["cfg"]
    assert cfg.apm_warmup_epochs <= 1 and cfg.epochs == cfg.apm_warmup_epochs + 1  # the least there is
    assert cfg.augmented_copies == 0
    assert seen["deadline"] <= long_ago + 10 * 60 and seen["joint"] > 0
    with pytest.raises(StopIteration):
        run.run_training(engine, spleen_cases[:3], spleen_cases[3:4], options, say=lambda t: None)
    assert seen["cfg"].epochs > 2  # counted from now, ten minutes hold more


def test_the_machines_rates_are_a_median_not_one_run(monkeypatch):
    """One timed run swung by 2x on a 2-core machine and the plan's estimate with it: the rate is the median
    of the runs after the first (allocation, kernel selection)."""
    from PromiseSegmentLib.training import rates

    clock = iter([0.0, 9.0, 9.0, 11.8, 11.8, 11.9, 11.9, 12.0])  # runs of 9, 2.8, 0.1 and 0.1 s
    monkeypatch.setattr(rates.time, "perf_counter", lambda: next(clock))
    assert rates._seconds(lambda: None) == pytest.approx(0.1)
