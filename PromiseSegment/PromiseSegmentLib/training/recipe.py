"""Training recipes (torch-free): the schedule chosen from the data size and the backbone, the plan a run
prints before any work, its time estimate from rates measured on this machine, and the scaling of a plan
to a time budget.

``auto`` is the best recipe this project measured (docs/benchmarks.md): every image encoded once into a
feature cache on disk; the APM warmed up alone on its box loss; then the joint phase. Large sets keep the
APM as warmed up (``apm_joint_lr`` 0) and train IPS on a mix of the APM's boxes and jittered ground-truth
boxes, so one adapter serves automatic and box modes, in a schedule that fits about half an hour on two
CPU cores. A few slices get the demo's settings: a long schedule, the APM trained on in the joint phase on
its own boxes only, and a fifth of the images to select the epoch (patient-grouped cross-validation on CT:
0.890 mean Dice against 0.575 with augmented copies and ground-truth boxes). ``paper`` is ProMISe's schedule
(200 epochs, lr 1e-5, on-line augmentation that encodes every image at every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from PromiseSegmentLib.training.config import TrainConfig, first_scored_warmup_epoch

RECIPES = ("auto", "paper")
SELECTION_FRACTION = 0.1  # of the training images, held out to select the epoch (never the user's val/)
SMALL_SELECTION_FRACTION = 0.2  # under SMALL_SET images: 2 selection images pick epochs by chance (3 of 15 here)
SMALL_SET = 100  # fewer training images: the demo's schedule (more epochs, the APM trained in the joint phase)
AUTO_BUDGET_MIN = 30.0  # auto without a budget or epoch options: its plan is scaled to fit this on this machine
SCHEDULE_OPTIONS = ("epochs", "apm_warmup_epochs", "augmented_copies")  # the user's own schedule: not rescaled
# Decodes per selection image outside the epochs: the frozen backbone's box bar and the box refinements (7)
# that ``training.selection.choose_refinement`` chooses from.
CHOICE_DECODES = 8


@dataclass(frozen=True)
class MachineRates:
    """Seconds per image on this machine, measured with the loaded backbone (``trainer.measure_rates``)."""

    encode: float  # encoder (+ the APM's taps)
    warmup_step: float  # APM forward + backward
    joint_step: float  # APM + IPS + decoder forward + backward
    evaluate: float  # the same forward without backward (epoch selection)
    where: str  # e.g. "2 CPU threads", "cuda:0"


def recipe_config(recipe: str, n_train: int, box_apm: bool = True, **overrides: Any) -> TrainConfig:
    """The configuration of ``recipe`` for ``n_train`` training images, with ``overrides`` (the user's own
    options, ``TrainConfig`` field names) applied on top."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    if recipe == "paper":
        return replace(TrainConfig(), **overrides)
    small = n_train < SMALL_SET
    # Large sets: a narrow APM warmed up long (2.5x cheaper per step than width 128: 50 warm-up epochs cost what
    # 20 did, selection Dice 0.841 vs 0.806 on Kvasir), then one joint epoch for IPS (docs/benchmarks.md).
    warmup, joint = (40, 25) if small else (50, 1)
    warmup = warmup if box_apm else 0
    values: Dict[str, Any] = dict(
        epochs=warmup + joint,
        apm_warmup_epochs=warmup,
        batch_size=4 if small else 8,
        lr=1e-3,
        augment=False,
        cache_features=True,
        augmented_copies=0,  # few images: copies measured worse (docs/benchmarks.md); many: encodes dominate
        apm_fusion_dim=64,
        apm_tap_pool=2,
        apm_joint_lr=(1.0 if small else 0.0) if box_apm else 1.0,
        # IPS also trained on ground-truth boxes, for box mode: on a few slices it cost automatic mode dearly
        user_box_share=0.5 if box_apm and not small else 0.0,
    )
    if "epochs" in overrides and "apm_warmup_epochs" not in overrides:  # the same share of warm-up
        values["apm_warmup_epochs"] = min(
            round(overrides["epochs"] * warmup / (warmup + joint)), overrides["epochs"] - 1
        )
    values.update(overrides)
    return replace(TrainConfig(), **values)


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, value))


@dataclass(frozen=True)
class TrainPlan:
    """What a run will do: its configuration, the images it trains and selects on, and where it runs."""

    recipe: str
    config: TrainConfig
    n_train: int
    n_select: int
    box_apm: bool = True  # the box refinement is chosen after the epochs

    def encodes(self) -> int:
        """Images through the encoder: each version once with the cache, every step without it."""
        cfg = self.config
        if cfg.cache_features and not cfg.augment:
            return self.n_train * (1 + cfg.augmented_copies) + self.n_select
        return self.n_train * cfg.epochs + self.n_select

    def phase_seconds(self, rates: MachineRates) -> Dict[str, float]:
        cfg = self.config
        warmup, joint = cfg.apm_warmup_epochs, cfg.epochs - cfg.apm_warmup_epochs
        select = self.n_select * rates.evaluate * (cfg.epochs - cfg.apm_warmup_epochs)
        warmup_scores = self.n_select * rates.evaluate * (warmup - first_scored_warmup_epoch(cfg))
        if cfg.cache_features and not cfg.augment:
            phases = {"encode": self.encodes() * rates.encode}
            step_encode = 0.0
        else:
            phases, step_encode = {"encode": self.n_select * rates.encode}, rates.encode
        phases["apm warm-up"] = warmup * self.n_train * (rates.warmup_step + step_encode) + warmup_scores
        phases["joint"] = joint * self.n_train * (rates.joint_step + step_encode) + select
        choose = self.box_apm and cfg.use_apm and cfg.mode == "apm+ips"
        phases["choose"] = self.n_select * rates.evaluate * CHOICE_DECODES if choose else 0.0
        return phases

    def joint_epoch_seconds(self, rates: MachineRates) -> float:
        """One joint epoch with its selection: what a shortened warm-up must leave room for."""
        joint = max(1, self.config.epochs - self.config.apm_warmup_epochs)
        return self.phase_seconds(rates)["joint"] / joint

    def describe(self, rates: MachineRates, backbone: str) -> List[str]:
        cfg, p = self.config, self.phase_seconds(rates)
        versions = f" x {1 + cfg.augmented_copies} versions" if cfg.cache_features and cfg.augmented_copies else ""
        joint = cfg.epochs - cfg.apm_warmup_epochs
        ips = "IPS" if cfg.use_ips else "APM"
        apm = "; APM kept as warmed up" if cfg.apm_warmup_epochs and cfg.apm_joint_lr == 0 else ""
        boxes = f"; {cfg.user_box_share:.0%} ground-truth boxes" if cfg.user_box_share else ""
        lines = [
            f"plan (recipe {self.recipe}, {backbone} frozen; {self.n_train} training images, {self.n_select} to "
            f"select the epoch):",
            f"  1. encode {self.n_train}{versions} + {self.n_select} = {self.encodes():,} images  "
            f"~ {_minutes(p['encode'])}",
        ]
        if cfg.apm_warmup_epochs:
            lines.append(f"  2. APM warm-up: {_epochs(cfg.apm_warmup_epochs)}  ~ {_minutes(p['apm warm-up'])}")
        lines.append(f"  {len(lines)}. joint ({ips}{apm}{boxes}): {_epochs(joint)}  ~ {_minutes(p['joint'])}")
        if p["choose"]:
            lines.append(
                f"  {len(lines)}. box refinement chosen on the {self.n_select} selection images  "
                f"~ {_minutes(p['choose'])}"
            )
        lines.append(
            f"  about {_minutes(sum(p.values()))} on {rates.where} (measured here: encode {rates.encode:.2f} s, "
            f"warm-up step {1000 * rates.warmup_step:.0f} ms, joint step {1000 * rates.joint_step:.0f} ms per image)"
        )
        return lines


def fit_to_budget(plan: TrainPlan, rates: MachineRates, seconds: float) -> TrainPlan:
    """``plan`` scaled to fit ``seconds``: fewer augmented copies first, then fewer epochs in both phases
    (at least one of each). Unchanged when it already fits."""
    cfg = plan.config
    while _total(plan, rates) > seconds and cfg.augmented_copies > 0:
        cfg = replace(cfg, augmented_copies=cfg.augmented_copies - 1)
        plan = replace(plan, config=cfg)
    total = _total(plan, rates)
    if total <= seconds:
        return plan
    phases = plan.phase_seconds(rates)
    fixed = phases["choose"] + (phases["encode"] if cfg.cache_features and not cfg.augment else 0.0)
    share = max(0.0, seconds - fixed) / max(1e-9, total - fixed)
    warmup0, joint0 = cfg.apm_warmup_epochs, cfg.epochs - cfg.apm_warmup_epochs
    joint = max(1, int(joint0 * share))
    warmup = 0
    if warmup0:  # the warm-up takes what the joint epochs leave (a schedule of one joint epoch keeps it)
        left = seconds - fixed - joint * phases["joint"] / joint0
        warmup = _clamp(int(left / (phases["apm warm-up"] / warmup0)), 1, warmup0)
    return replace(plan, config=replace(cfg, epochs=warmup + joint, apm_warmup_epochs=warmup))


def _total(plan: TrainPlan, rates: MachineRates) -> float:
    return sum(plan.phase_seconds(rates).values())


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def selection_count(n_images: int, fraction: Optional[float]) -> int:
    """How many of ``n_images`` to hold out for selecting the epoch: at least one (a single image leaves
    none to train on, which ``setup.check_training_cases`` refuses)."""
    default = SMALL_SELECTION_FRACTION if n_images < SMALL_SET else SELECTION_FRACTION
    share = default if fraction is None else fraction
    return min(n_images, max(1, int(round(share * n_images))))


def split_for_selection(cases: List, fraction: Optional[float], seed: int) -> Tuple[List, List]:
    """(train, selection): a seeded random share of ``cases`` held out to select the epoch."""
    order = np.random.default_rng(seed).permutation(len(cases))
    n = selection_count(len(cases), fraction)
    return [cases[i] for i in order[n:]], [cases[i] for i in order[:n]]


@dataclass(frozen=True)
class RunOptions:
    """How a training run is set up beyond its hyperparameters: the recipe and the user's own settings on top
    of it (``TrainConfig`` fields), a time budget, the selection share, the feature cache's folder, and how
    volumes become slices (``dense``: every slice annotated, so unlabelled ones are truly empty)."""

    recipe: str = "auto"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    time_budget_min: Optional[float] = None
    selection_fraction: Optional[float] = None
    feature_cache: Optional[str] = None
    dense: bool = False
    empty_share: float = 0.1
    axis: str = "K"

    def budget_minutes(self, given: bool = False) -> Optional[float]:
        """The budget the plan is fitted to and training stops at: the user's, else ``AUTO_BUDGET_MIN`` for
        the auto recipe unless the user set its schedule (epochs, warm-up or copies) or ``given`` a whole
        configuration (an interrupted run's)."""
        if self.time_budget_min:
            return self.time_budget_min
        if not given and self.recipe == "auto" and not any(k in self.overrides for k in SCHEDULE_OPTIONS):
            return AUTO_BUDGET_MIN
        return None

    def config(self, n_train: int, box_apm: bool) -> TrainConfig:
        return recipe_config(self.recipe, n_train, box_apm, **dict(self.overrides))
