"""Training an APM/IPS adapter on a frozen backbone.

The loss of a step is in ``step``; the backbone is frozen and checked bit-identical after training.

Selection: the later warm-up epochs are scored by their APM's prompts through the frozen decoder, and the best
one's APM goes on to the joint phase (at a constant learning rate the score swings by up to 0.05 from one
epoch to the next, so the last epoch is a lottery); joint epochs are scored with IPS and the best is kept.

Phases - encode (feature cache), APM warm-up, joint - report progress per image and batch (``TrainStatus``);
a deadline ends the warm-up early and stops after the last joint epoch that fits, keeping the best so far.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, cast

import numpy as np
import torch

from PromiseSegmentLib.callbacks import CancelFn
from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.errors import Cancelled
from PromiseSegmentLib.inference.engine import InferenceEngine
from PromiseSegmentLib.inference.openvino_runtime import release_compiled_encoders
from PromiseSegmentLib.model.adapter import Adapter, save_adapter
from PromiseSegmentLib.training.batches import Encoded, collate
from PromiseSegmentLib.training.config import TrainConfig, first_scored_warmup_epoch, lr_factor
from PromiseSegmentLib.training.features import PARTS_FOR_WARMUP, OnlineFeatures, StoredFeatures
from PromiseSegmentLib.training.records import EpochRecord, TrainProgress, TrainResult, TrainStatus
from PromiseSegmentLib.training.resume import data_fingerprint, restore_state, save_state
from PromiseSegmentLib.training.selection import choose_refinement, frozen_box_dice, score_epoch
from PromiseSegmentLib.training.setup import backbone_fingerprint, build_adapter, check_training_cases, track_apm
from PromiseSegmentLib.training.step import joint_loss, warmup_loss
from PromiseSegmentLib.training.weight_average import WeightAverage

log = logging.getLogger(__name__)


class Trainer:
    """One training run: encode, resume, epochs (APM warm-up, then joint), selection, saving."""

    def __init__(
        self,
        engine: InferenceEngine,
        train: List[Case],
        val: List[Case],
        cfg: TrainConfig,
        output: Optional[Path],
        feature_cache: Optional[Path] = None,
        deadline: Optional[float] = None,
        joint_seconds: float = 0.0,
    ):
        cfg.check()
        check_training_cases(train, val)
        self.engine, self.train, self.val, self.cfg, self.deadline = engine, train, val, cfg, deadline
        self.joint_seconds = joint_seconds  # an estimate of one joint epoch, which a shortened warm-up leaves time for
        self.output = Path(output) if output else None
        self.state_path = Path(str(output) + ".state.pt") if output else None
        self.data = data_fingerprint(train, val) if output else None
        self.adapter = build_adapter(cfg, engine.backbone).to(engine.device)
        engine.capture_taps = self.adapter.apm is not None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.optim = torch.optim.Adam(self.param_groups(), lr=cfg.lr)
        self.history: List[EpochRecord] = []
        self.best, self.first_epoch, self.frozen_box = -1.0, 0, float("nan")
        self.best_state: Optional[Dict[str, Dict[str, torch.Tensor]]] = None
        self.best_warmup = -1.0  # the best warm-up epoch's selection Dice, and its APM
        self.best_warmup_apm: Optional[Dict[str, torch.Tensor]] = None
        self.warmup_average, self.kept_warmup_average = WeightAverage(), False  # the scored epochs' mean APM
        self.warmup_mean_dice = float("nan")  # its selection Dice, once scored
        self.refinement_scores: List[Dict[str, float]] = []
        cached, apm = cfg.cache_features and not cfg.augment, self.adapter.apm
        copies = cfg.augmented_copies if cached else 0
        self.features = StoredFeatures(
            engine, apm, train if cached else [], val, copies, cfg.seed, self.gen, feature_cache
        )
        self.train_src = self.features if cached else OnlineFeatures(engine, train, apm, self.gen, cfg.augment)

    def param_groups(self):
        """The APM first (its learning rate changes with the phase), then the other modules."""
        modules = self.adapter.modules()
        apm = [p for name, m in modules.items() if name == "apm" for p in m.parameters()]
        rest = [p for name, m in modules.items() if name != "apm" for p in m.parameters()]
        return [g for g in ({"params": apm}, {"params": rest}) if g["params"]]

    def resume(self) -> None:
        if not (self.state_path and self.state_path.exists()):
            return
        st = restore_state(self, self.state_path)
        self.history = [EpochRecord(**r) for r in st["history"]]
        self.best, self.first_epoch, self.best_state = st["best"], st["epoch"] + 1, st["best_modules"]
        self.best_warmup, self.best_warmup_apm = st.get("best_warmup", -1.0), st.get("best_warmup_apm")
        self.warmup_average = WeightAverage(st.get("warmup_average"))
        self.kept_warmup_average = bool(st.get("kept_warmup_average", False))
        self.warmup_mean_dice = float(st.get("warmup_mean_dice", float("nan")))
        log.info("resumed from %s at epoch %d", self.state_path, self.first_epoch)

    # ------------------------------------------------------------------------------------ one step
    def step(self, items: List[Encoded], warmup: bool) -> float:
        cfg, dev = self.cfg, self.engine.device
        batch = collate(items, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" and cfg.bf16):
            if warmup:
                loss = warmup_loss(self.adapter, cfg, batch, self.gen, self.engine.spec.image_size)
            else:
                loss = joint_loss(self.engine, self.adapter, cfg, items, batch, self.rng)
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        return float(loss.item())

    # ------------------------------------------------------------------------------------ epochs
    def epoch(
        self,
        epoch: int,
        warmup: Optional[bool] = None,
        report: Optional[Callable[[int, int], None]] = None,
        cancel: Optional[CancelFn] = None,
    ) -> EpochRecord:
        """One pass over the training images (``warmup``: the APM alone; default: as the configuration's
        schedule says), then the selection scores."""
        if warmup is None:
            warmup = self.adapter.apm is not None and epoch < self.cfg.apm_warmup_epochs
        if self.features.count and self.features.store is None:
            self.prepare()
        started = time.time()
        lr = self.cfg.lr * lr_factor(self.cfg, epoch, warmup)
        for group in self.optim.param_groups:
            group["lr"] = lr
        if self.adapter.apm is not None:  # group 0 is the APM
            self.optim.param_groups[0]["lr"] = lr * (1.0 if warmup else self.cfg.apm_joint_lr)
        for m in self.adapter.modules().values():
            m.train()
        track_apm(self.adapter, self.cfg, warmup)
        order = torch.randperm(len(self.train), generator=self.gen).tolist()
        size, losses = self.cfg.batch_size, []
        batches = range(0, len(order), size)
        for k, b in enumerate(batches):
            if cancel is not None and cancel():
                raise Cancelled()
            items = self.train_src.get(order[b : b + size], PARTS_FOR_WARMUP if warmup else ())
            losses.append(self.step(items, warmup))
            if report:
                report(k + 1, len(batches))
        scored = self.val and (not warmup or epoch >= first_scored_warmup_epoch(self.cfg))
        scores = score_epoch(self, self._without_ips() if warmup else None) if scored else None
        nan = float("nan")
        return EpochRecord(
            epoch,
            "apm warm-up" if warmup else "joint",
            float(np.mean(losses)),
            scores.dice if scores else nan,
            scores.box_dice if scores else nan,
            scores.box_iou if scores else nan,
            time.time() - started,
        )

    def run(self, resume: bool, progress: Optional[TrainProgress], cancel: Optional[CancelFn]) -> TrainResult:
        start = time.time()
        before = backbone_fingerprint(self.engine.sam)
        if any(p.requires_grad for p in self.engine.sam.parameters()):
            raise RuntimeError("the backbone must be frozen")
        finished = False
        try:
            if resume:
                self.resume()
            self.prepare(progress, cancel)
            self._epochs(progress, cancel)
            if backbone_fingerprint(self.engine.sam) != before:
                raise RuntimeError("the backbone's weights changed during training; this is a bug")
            result = self._finish(start)
            finished = True
        finally:
            self.features.close(finished)
            if not finished and self.features.owned and self.features.count:
                log.info("the feature cache %s is kept for --resume (delete it otherwise)", self.features.folder)
        return result

    def prepare(self, progress: Optional[TrainProgress] = None, cancel: Optional[CancelFn] = None) -> None:
        """The encode phase: every image (and version) into the feature store, once."""
        if not self.features.count:
            return
        report = (lambda done, total: progress(TrainStatus("encode", done, total))) if progress else None
        self.features.prepare(report, cancel)
        if self.train_src is self.features:  # every epoch reads the store: the encoder's buffers can go
            release_compiled_encoders(self.engine.backbone)
        if self.val and self.cfg.mode == "apm+ips" and self.adapter.ips is not None:
            self.frozen_box = frozen_box_dice(self)

    def _epochs(self, progress: Optional[TrainProgress], cancel: Optional[CancelFn]) -> None:
        warmup_end = self.cfg.apm_warmup_epochs if self.adapter.apm is not None else 0
        epochs, epoch = self.cfg.epochs, self.first_epoch
        while epoch < epochs:
            warmup = epoch < warmup_end
            phase, first, length = (
                ("apm warm-up", 0, warmup_end) if warmup else ("joint", warmup_end, epochs - warmup_end)
            )

            def report(done, total, epoch=epoch, phase=phase, first=first, length=length):
                if progress:
                    progress(TrainStatus(phase, (epoch - first) * total + done, length * total, epoch, epochs))

            if epoch == warmup_end:
                self._restore_best_warmup()
            record = self.epoch(epoch, warmup, report, cancel)
            after_next = time.monotonic() + record.seconds + (self.joint_seconds if warmup else 0.0)
            over = self.deadline is not None and after_next > self.deadline
            if over and warmup:  # end the warm-up now and run one joint epoch
                warmup_end, epochs = epoch + 1, epoch + 2
                log.info("time budget: the APM warm-up ends after epoch %d; one joint epoch follows", epoch + 1)
                if self.val and not np.isfinite(record.val_dice):  # a cut warm-up's last epoch is a candidate too
                    record.val_dice = score_epoch(self, self._without_ips()).dice
            self._keep(record, epoch)
            if progress:
                progress(TrainStatus(phase, (epoch - first + 1), length, epoch, epochs, record))
            if over and not warmup and self.best_state is not None:
                log.info("time budget reached after epoch %d; the best adapter so far is kept", epoch + 1)
                break
            epoch += 1

    def _without_ips(self) -> Adapter:
        """The adapter as a warm-up epoch is scored: its APM's prompts through the frozen decoder."""
        return replace(self.adapter, ips=None)

    def _restore_best_warmup(self) -> None:
        """The best scored warm-up epoch's APM, or the mean of the scored epochs' APMs where that scores
        higher (``weight_average``), goes on to the joint phase."""
        if self.best_warmup_apm is None or self.adapter.apm is None:
            return
        mean = self.warmup_average.mean()
        if mean is not None and self.val:
            self.adapter.apm.load_state_dict(mean)
            score = self.warmup_mean_dice = score_epoch(self, self._without_ips()).dice
            log.info("the mean APM of %d warm-up epochs: selection Dice %.3f", self.warmup_average.count, score)
            if score > self.best_warmup:
                self.best_warmup, self.best_warmup_apm, self.kept_warmup_average = score, mean, True
        self.adapter.apm.load_state_dict(self.best_warmup_apm)
        kept = f"the mean of {self.warmup_average.count}" if self.kept_warmup_average else self._best_warmup_epoch()
        log.info(
            "the APM of warm-up epoch(s) %s (selection Dice %.3f) goes on to the joint phase", kept, self.best_warmup
        )

    def _best_warmup_epoch(self) -> Optional[int]:
        """The kept warm-up epoch, counted from 1 (None: none was scored)."""
        kept = [r.epoch for r in self.history if r.phase == "apm warm-up" and r.val_dice == self.best_warmup]
        return kept[0] + 1 if kept and self.best_warmup_apm is not None and not self.kept_warmup_average else None

    def _keep(self, record: EpochRecord, epoch: int) -> None:
        self.history.append(record)
        if record.phase == "apm warm-up" and record.val_dice > self.best_warmup:
            apm = cast(torch.nn.Module, self.adapter.apm)
            self.best_warmup = record.val_dice
            self.best_warmup_apm = {k: v.detach().cpu().clone() for k, v in apm.state_dict().items()}
        if record.phase == "apm warm-up" and np.isfinite(record.val_dice):
            self.warmup_average.add(cast(torch.nn.Module, self.adapter.apm).state_dict())
        if record.phase == "joint" and (not self.val or record.val_dice > self.best):
            self.best, self.best_state = record.val_dice, self.snapshot()
            if self.output:
                save_adapter(self.final_adapter(), self.output, self.best_state)
        if self.state_path:
            save_state(self, epoch)

    def _finish(self, start: float) -> TrainResult:
        if self.best_state is None:
            raise RuntimeError("no epoch was selected (no joint epoch gave a validation Dice); this is a bug")
        for name, m in self.adapter.modules().items():
            m.load_state_dict(self.best_state[name])
        apm = self.adapter.apm
        if self.val and self.cfg.mode == "apm+ips" and apm is not None and apm.box_head is not None:
            self.refinement_scores = choose_refinement(self)
        adapter = self.final_adapter().eval()
        if self.output and self.state_path:
            save_adapter(adapter, self.output)
            self.state_path.unlink(missing_ok=True)  # finished: the resumable state is only for interrupted runs
        return TrainResult(adapter, self.history, self.best, time.time() - start)

    def snapshot(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {
            n: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            for n, m in self.adapter.modules().items()
        }

    def final_adapter(self) -> Adapter:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()}
        best = next((r for r in self.history if r.phase == "joint" and r.val_dice == self.best), None)
        a = self.adapter
        a.training = {
            "train_cases": len(self.train),
            "val_cases": len(self.val),
            "epochs": len(self.history),
            "best_val_dice": self.best,
            "mode": self.cfg.mode,
            "config": cfg,
            "seconds_per_epoch": float(np.mean([r.seconds for r in self.history])) if self.history else 0,
        }
        if best is not None and np.isfinite(best.val_box_dice):
            a.training["val_box_dice"] = best.val_box_dice
            a.training["val_frozen_box_dice"] = self.frozen_box
            # the user's box with IPS only where IPS measured at least as good as the frozen decoder
            a.training["ips_for_user_box"] = bool(best.val_box_dice >= self.frozen_box)
        kept = self._best_warmup_epoch()
        if kept is not None:
            a.training["apm_warmup_epoch_kept"] = kept
            a.training["apm_warmup_val_dice"] = self.best_warmup
        if np.isfinite(self.warmup_mean_dice):  # the mean of the scored epochs' APMs, kept or not
            a.training["apm_warmup_mean_val_dice"] = self.warmup_mean_dice
        if self.kept_warmup_average:
            a.training["apm_warmup_mean_of_epochs"] = self.warmup_average.count
            a.training["apm_warmup_val_dice"] = self.best_warmup
        if self.refinement_scores:
            a.training["box_refinement_val_dice"] = self.refinement_scores
        return a


def train_adapter(
    engine: InferenceEngine,
    train: List[Case],
    val: List[Case],
    cfg: TrainConfig,
    output: Optional[Path] = None,
    resume: bool = False,
    progress: Optional[TrainProgress] = None,
    cancel: Optional[CancelFn] = None,
    feature_cache: Optional[Path] = None,
    deadline: Optional[float] = None,
    joint_seconds: float = 0.0,
) -> TrainResult:
    """Train on ``train``, select the epoch with the best Dice on ``val`` (held-out selection images); writes
    ``output`` (best adapter) and ``output.state.pt`` (resumable state, every epoch, atomically) when
    ``output`` is given. ``deadline`` (``time.monotonic()`` seconds) bounds the epochs; the warm-up ends
    early enough to leave ``joint_seconds`` (one joint epoch) before it."""
    trainer = Trainer(engine, train, val, cfg, output, feature_cache, deadline, joint_seconds)
    return trainer.run(resume, progress, cancel)
