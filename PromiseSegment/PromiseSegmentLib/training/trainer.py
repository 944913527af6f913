"""Training an APM/IPS adapter on a frozen backbone.

Loss: BCE + soft Dice on the backbone's decode token at 256x256 (the paper's mask loss). A box APM
may add an auxiliary loss (``box_loss_weight``): L1 + generalised IoU between its box and the mask's
bounding box, BCE of its objectness map against the mask, and BCE of its presence logit. This departs
from the paper's mask-only training on purpose: through the prompt encoder's Fourier features the
mask loss alone barely moves a box (measured in the README). ``apm_warmup_epochs`` trains the APM
alone on the auxiliary loss first, so IPS cannot absorb what the APM should learn. The backbone is
frozen and checked bit-identical after training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from PromiseSegmentLib.atomic_write import write_atomically
from PromiseSegmentLib.backbones.base import LoadedBackbone
from PromiseSegmentLib.callbacks import CancelFn
from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.errors import Cancelled, InputError
from PromiseSegmentLib.inference.engine import InferenceEngine, PromptBatch
from PromiseSegmentLib.model.adapter import Adapter, BackboneRecord, save_adapter
from PromiseSegmentLib.model.apm import APM, default_slot_labels
from PromiseSegmentLib.model.forward import promise_forward, refine_boxes
from PromiseSegmentLib.model.ips import IPS
from PromiseSegmentLib.training.batches import Encoded, collate, flip_batch, user_prompts
from PromiseSegmentLib.training.config import TrainConfig
from PromiseSegmentLib.training.features import FeatureSource
from PromiseSegmentLib.training.losses import apm_aux_loss, batch_dice, box_iou, seg_loss
from PromiseSegmentLib.training.resume import check_zip, data_fingerprint, read_resume_state, resume_config

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter: Adapter
    history: List[Dict[str, float]]
    best_val_dice: float
    seconds: float


def backbone_fingerprint(sam) -> str:
    h = hashlib.sha256()
    for k, v in sorted(sam.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_adapter(cfg: TrainConfig, backbone: LoadedBackbone) -> Adapter:
    torch.manual_seed(cfg.seed)
    spec = backbone.spec
    apm = None
    if cfg.use_apm and cfg.user_prompt == "none":
        apm = APM(
            spec.tap_channels,
            spec.image_size,
            tuple(cfg.apm_prompts or spec.apm_prompts),
            default_slot_labels(cfg.n_points, cfg.n_positive),
            cfg.apm_fusion_dim,
            cfg.apm_head_blocks,
            cfg.apm_tap_pool,
        )
    ips = IPS() if cfg.use_ips else None
    if apm is None and ips is None:
        raise InputError("nothing to train: enable the APM and/or IPS")
    return Adapter(
        BackboneRecord.of(backbone),
        apm,
        ips,
        IntensityRule.from_dict(cfg.intensity),
        cfg.target_name,
        tuple(cfg.target_color),
    )


def lr_factor(cfg: TrainConfig, epoch: int, warmup: bool) -> float:
    """The share of ``lr`` for ``epoch``: 1 (constant), or a cosine from 1 over the epoch's phase."""
    if cfg.lr_schedule == "constant":
        return 1.0
    start, length = (
        (0, cfg.apm_warmup_epochs) if warmup else (cfg.apm_warmup_epochs, cfg.epochs - cfg.apm_warmup_epochs)
    )
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / max(1, length)))


# Box refinements tried after training (steps, margin as a share of the box side); see ``choose_refinement``.
REFINEMENTS = ((0, 0.0), (1, 0.0), (1, 0.05), (1, 0.1), (1, 0.2), (2, 0.1))
REFINEMENT_GAIN = 0.002


class Trainer:
    """One training run: resume, epochs (APM warm-up, then joint), model selection, saving."""

    def __init__(
        self, engine: InferenceEngine, train: List[Case], val: List[Case], cfg: TrainConfig, output: Optional[Path]
    ):
        cfg.check()
        check_training_cases(train, val)
        self.engine, self.train, self.val, self.cfg = engine, train, val, cfg
        self.output = Path(output) if output else None
        self.state_path = Path(str(output) + ".state.pt") if output else None
        self.data = data_fingerprint(train, val) if output else None
        self.adapter = build_adapter(cfg, engine.backbone).to(engine.device)
        engine.capture_taps = self.adapter.apm is not None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.optim = torch.optim.Adam(self.param_groups(), lr=cfg.lr)
        self.history: List[Dict[str, float]] = []
        self.best, self.first_epoch = -1.0, 0
        self.best_state: Optional[Dict[str, Dict[str, torch.Tensor]]] = None
        self.refinement_scores: List[Dict[str, float]] = []
        self.train_src = FeatureSource(
            engine, train, cfg.cache_features, self.gen, cfg.augment, self.adapter.apm, cfg.augmented_copies, cfg.seed
        )
        self.val_src = FeatureSource(engine, val, True, self.gen, False, self.adapter.apm)

    def param_groups(self):
        """The APM first (its learning rate changes with the phase), then the other modules."""
        modules = self.adapter.modules()
        apm = [p for name, m in modules.items() if name == "apm" for p in m.parameters()]
        rest = [p for name, m in modules.items() if name != "apm" for p in m.parameters()]
        return [g for g in ({"params": apm}, {"params": rest}) if g["params"]]

    def resume(self) -> None:
        if not (self.state_path and self.state_path.exists()):
            return
        st = read_resume_state(self.state_path, self.cfg, (self.train, self.val))
        if st["backbone"] != self.engine.backbone.identity:
            raise InputError(
                f"{self.state_path} was written on backbone weights {st['backbone']}, now "
                f"{self.engine.backbone.identity}: resume with the same --backbone"
            )
        try:
            for name, m in self.adapter.modules().items():
                m.load_state_dict(st["modules"][name])
            self.optim.load_state_dict(st["optim"])
            self.gen.set_state(st["generator"])
        except Exception as exc:
            raise InputError(
                f"{self.state_path} is damaged ({type(exc).__name__}); delete it or start again with --overwrite"
            ) from None
        self.history, self.best, self.first_epoch = st["history"], st["best"], st["epoch"] + 1
        self.best_state = st["best_modules"]
        log.info("resumed from %s at epoch %d", self.state_path, self.first_epoch)

    def step(self, items: List[Encoded], warmup: bool) -> float:
        cfg, spec, dev = self.cfg, self.engine.spec, self.engine.device
        batch = collate(items, dev)
        use_autocast = dev.type == "cuda" and cfg.bf16
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
            if warmup:
                if cfg.flip_warmup:
                    batch = flip_batch(batch, self.gen, spec.image_size)
                assert self.adapter.apm is not None, "a warm-up epoch needs an APM"
                loss = apm_aux_loss(self.adapter.apm(batch.taps, prepared=True), batch, spec.image_size)
            else:
                user = user_prompts(items, batch, cfg.user_prompt, self.rng, spec, jitter=0.05)
                out = promise_forward(
                    self.engine.backbone, self.adapter, batch.features, batch.taps, user, cfg.mode, taps_prepared=True
                )
                loss = seg_loss(out.low_res[:, 0].float(), batch.target)
                if cfg.box_loss_weight and out.apm is not None:
                    loss = loss + cfg.box_loss_weight * apm_aux_loss(out.apm, batch, spec.image_size)
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        return float(loss.item())

    def epoch(self, epoch: int, cancel: Optional[CancelFn]) -> Dict[str, Any]:
        started = time.time()
        warmup = self.adapter.apm is not None and epoch < self.cfg.apm_warmup_epochs
        lr = self.cfg.lr * lr_factor(self.cfg, epoch, warmup)
        for group in self.optim.param_groups:
            group["lr"] = lr
        if self.adapter.apm is not None:  # group 0 is the APM
            self.optim.param_groups[0]["lr"] = lr * (1.0 if warmup else self.cfg.apm_joint_lr)
        for m in self.adapter.modules().values():
            m.train()
        order = torch.randperm(len(self.train), generator=self.gen).tolist()
        losses = []
        for b in range(0, len(order), self.cfg.batch_size):
            if cancel is not None and cancel():
                raise Cancelled()
            losses.append(self.step(self.train_src.get(order[b : b + self.cfg.batch_size]), warmup))
        val_dice, val_box_iou = self.validate() if self.val else (float("nan"), float("nan"))
        return {
            "epoch": epoch,
            "phase": "apm warm-up" if warmup else "joint",
            "loss": float(np.mean(losses)),
            "val_dice": val_dice,
            "val_box_iou": val_box_iou,
            "seconds": time.time() - started,
        }

    @torch.no_grad()
    def validate(self):
        """Mean Dice in the 256x256 decoder frame (fast model selection; final metrics use full resolution)
        and the APM box's mean IoU with the mask's box."""
        for m in self.adapter.modules().values():
            m.eval()
        scores, ious = [], []
        rng = np.random.default_rng(0)  # the same simulated prompts every epoch
        for b in range(0, len(self.val), self.cfg.batch_size):
            items = self.val_src.get(range(b, min(len(self.val), b + self.cfg.batch_size)))
            batch = collate(items, self.engine.device)
            user = user_prompts(items, batch, self.cfg.user_prompt, rng, self.engine.spec)
            out = promise_forward(
                self.engine.backbone, self.adapter, batch.features, batch.taps, user, self.cfg.mode, taps_prepared=True
            )
            scores += batch_dice(out.low_res[:, 0].float(), batch.target)
            if out.apm is not None and out.apm.box is not None and bool(batch.present.any()):
                ious += box_iou(out.apm.box[batch.present], batch.boxes[batch.present]).iou.tolist()
        return float(np.mean(scores)), float(np.mean(ious)) if ious else float("nan")

    @torch.no_grad()
    def choose_refinement(self) -> List[Dict[str, float]]:
        """Set the APM's box refinement (``promise.refine_boxes``) to the candidate with the best validation
        Dice, measured like ``validate``; a refinement must beat none by ``REFINEMENT_GAIN`` to be chosen
        (it costs a decode per step). Returns every candidate with its Dice."""
        apm = self.adapter.apm
        for m in self.adapter.modules().values():
            m.eval()
        scores: Dict[tuple, List[float]] = {c: [] for c in REFINEMENTS}
        for b in range(0, len(self.val), self.cfg.batch_size):
            items = self.val_src.get(range(b, min(len(self.val), b + self.cfg.batch_size)))
            batch = collate(items, self.engine.device)
            out = promise_forward(
                self.engine.backbone,
                self.adapter,
                batch.features,
                batch.taps,
                PromptBatch(),
                "apm+ips",
                taps_prepared=True,
            )
            for steps, margin in REFINEMENTS:
                refined = refine_boxes(
                    self.engine.backbone,
                    self.adapter,
                    batch.features,
                    out,
                    [it.input_size for it in items],
                    self.engine.mask_threshold,
                    steps,
                    margin,
                )
                scores[(steps, margin)] += batch_dice(refined.low_res[:, 0].float(), batch.target)
        means = {c: float(np.mean(v)) for c, v in scores.items()}
        best = max(REFINEMENTS, key=lambda c: means[c] - (REFINEMENT_GAIN if c[0] else 0.0))
        assert apm is not None, "box refinement is chosen only for an APM"
        apm.set_refinement(*best)
        log.info("box refinement %s (validation Dice %s)", best, means)
        return [{"steps": steps, "margin": margin, "val_dice": d} for (steps, margin), d in means.items()]

    def snapshot(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {
            n: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            for n, m in self.adapter.modules().items()
        }

    def final_adapter(self) -> Adapter:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()}
        a = self.adapter
        a.training = {
            "train_cases": len(self.train),
            "val_cases": len(self.val),
            "epochs": len(self.history),
            "best_val_dice": self.best,
            "mode": self.cfg.mode,
            "config": cfg,
            "seconds_per_epoch": float(np.mean([h["seconds"] for h in self.history])) if self.history else 0,
        }
        if self.refinement_scores:
            a.training["box_refinement_val_dice"] = self.refinement_scores
        return a

    def save_state(self, epoch: int) -> None:
        state = {
            "modules": {n: m.state_dict() for n, m in self.adapter.modules().items()},
            "optim": self.optim.state_dict(),
            "generator": self.gen.get_state(),
            "history": self.history,
            "best": self.best,
            "epoch": epoch,
            "best_modules": self.best_state,
            "config": resume_config(self.cfg),
            "cases": [len(self.train), len(self.val)],
            "backbone": self.engine.backbone.identity,
            "data": self.data,
        }
        write_atomically(self.state_path, lambda tmp: torch.save(state, tmp), verify=check_zip)

    def run(self, resume: bool, progress, cancel) -> TrainResult:
        start = time.time()
        before = backbone_fingerprint(self.engine.sam)
        if any(p.requires_grad for p in self.engine.sam.parameters()):
            raise RuntimeError("the backbone must be frozen")
        if resume:
            self.resume()
        for epoch in range(self.first_epoch, self.cfg.epochs):
            row = self.epoch(epoch, cancel)
            self.history.append(row)
            selectable = row["phase"] == "joint"
            if selectable and (not self.val or row["val_dice"] > self.best):
                self.best, self.best_state = row["val_dice"], self.snapshot()
                if self.output:
                    save_adapter(self.final_adapter(), self.output, self.best_state)
            if self.state_path:
                self.save_state(epoch)
            if progress:
                progress(epoch + 1, self.cfg.epochs, row)
        if backbone_fingerprint(self.engine.sam) != before:
            raise RuntimeError("the backbone's weights changed during training; this is a bug")
        if self.best_state is None:
            raise RuntimeError("no epoch was selected (no joint epoch gave a validation Dice); this is a bug")
        for name, m in self.adapter.modules().items():
            m.load_state_dict(self.best_state[name])
        apm = self.adapter.apm
        if self.val and self.cfg.mode == "apm+ips" and apm is not None and apm.box_head is not None:
            self.refinement_scores = self.choose_refinement()
        adapter = self.final_adapter().eval()
        if self.output and self.state_path:
            save_adapter(adapter, self.output)
            self.state_path.unlink(missing_ok=True)  # finished: the resumable state is only for interrupted runs
        return TrainResult(adapter, self.history, self.best, time.time() - start)


def check_training_cases(train: List[Case], val: List[Case]) -> None:
    """Refuse a training set nothing can be learnt from (before the backbone is loaded)."""
    if not train:
        raise InputError(
            f"no training cases ({len(val)} went to validation): give more images, or a smaller --val-fraction"
        )
    if not any(c.mask.any() for c in train):
        raise InputError(
            f"every training mask is empty ({len(train)} cases): there is nothing to learn (check "
            f"the label value or the mask files)"
        )
    if all(c.mask.all() for c in train):
        raise InputError(
            f"every training mask covers its whole image ({len(train)} cases): nothing tells the "
            f"target from its surroundings (check the label value or the mask files)"
        )


def train_adapter(
    engine: InferenceEngine,
    train: List[Case],
    val: List[Case],
    cfg: TrainConfig,
    output: Optional[Path] = None,
    resume: bool = False,
    progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> TrainResult:
    """Train on ``train``, select the epoch with the best Dice on ``val``; writes ``output`` (best adapter)
    and ``output.state.pt`` (resumable state, every epoch, atomically) when ``output`` is given."""
    return Trainer(engine, train, val, cfg, output).run(resume, progress, cancel)
