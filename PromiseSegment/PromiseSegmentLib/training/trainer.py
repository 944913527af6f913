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
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from PromiseSegmentLib.backbones.base import LoadedBackbone
from PromiseSegmentLib.data.datasets import Case, sample_points
from PromiseSegmentLib.data.preprocessing import IntensityRule, mask_bbox
from PromiseSegmentLib.errors import Cancelled, InputError
from PromiseSegmentLib.inference.engine import SamEngine, mask_to_low_res
from PromiseSegmentLib.model.adapter import Adapter, BackboneRecord, save_adapter
from PromiseSegmentLib.model.apm import APM, RESNET34_BLOCKS, default_slot_labels
from PromiseSegmentLib.model.ips import IPS
from PromiseSegmentLib.model.promise import PromptBatch, promise_forward, refine_boxes
from PromiseSegmentLib.names import DEFAULT_COLOR, DEFAULT_NAME
from PromiseSegmentLib.paths import write_atomically
from PromiseSegmentLib.training.augment import augment
from PromiseSegmentLib.training.losses import apm_aux_loss, batch_dice, box_iou, seg_loss
from PromiseSegmentLib.training.settings import OPTION_NAMES, check_train_settings

log = logging.getLogger(__name__)
STATE_KEYS = ("modules", "optim", "generator", "history", "best", "epoch", "best_modules", "config", "cases",
              "backbone", "data")
RESUMABLE_CHANGES = ("epochs",)  # options that may differ between an interrupted run and its resumption


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 8
    lr: float = 1e-5
    seed: int = 0
    augment: bool = True
    cache_features: bool = False  # encode once (fp16); only without augmentation
    augmented_copies: int = 0  # with cache_features: K augmented versions of each image, each encoded once
    use_apm: bool = True
    use_ips: bool = True
    apm_prompts: Optional[Sequence[str]] = None  # None: the backbone's (box for LiteMedSAM, points for SAM ViT)
    n_points: int = 16
    n_positive: int = 8
    apm_fusion_dim: int = 256
    apm_head_blocks: Sequence[int] = RESNET34_BLOCKS
    apm_tap_pool: int = 1  # average-pool the taps before the APM (2: a quarter of the cost)
    box_loss_weight: float = 1.0  # auxiliary APM loss (box, objectness, presence); 0 = the paper's mask loss only
    apm_warmup_epochs: int = 0  # epochs of APM alone on the auxiliary loss before the joint phase
    flip_warmup: bool = True  # random flips of the encoder taps (and boxes) during the APM warm-up
    apm_joint_lr: float = 1.0  # the APM's learning rate in the joint phase, as a share of lr (0: weights kept as
    # warmed up; its BatchNorm statistics still follow the data)
    lr_schedule: str = "constant"  # "cosine": within each phase (warm-up, joint), lr decays from lr towards 0
    user_prompt: str = "none"  # "box"/"points": no APM, IPS trained with prompts from the ground truth
    bf16: bool = True  # CUDA autocast; ignored on CPU
    target_name: str = DEFAULT_NAME
    target_color: Sequence[float] = DEFAULT_COLOR
    intensity: Dict = field(default_factory=lambda: IntensityRule().to_dict())

    def check(self) -> None:
        """Refuse settings that cannot train, before any model work (``validation.check_train_settings``,
        the rule the command line applies to its options)."""
        check_train_settings(asdict(self))
        IntensityRule.from_dict(self.intensity)

    @property
    def mode(self) -> str:
        """The ProMISe mode this configuration trains (``promise.resolve_mode``'s vocabulary)."""
        return "ips" if self.user_prompt != "none" or not self.use_apm else "apm+ips"


@dataclass
class TrainResult:
    adapter: Adapter
    history: List[Dict[str, float]]
    best_val_dice: float
    seconds: float


@dataclass
class Encoded:
    """One training image, encoded: what an epoch needs without the encoder."""

    features: torch.Tensor  # (1, 256, 64, 64) fp16
    taps: List[torch.Tensor]  # APM-ready taps (after ``APM.prepare_taps``), fp16
    target: torch.Tensor  # (256, 256) bool, the mask in the decoder's frame
    box: Optional[torch.Tensor]  # (4,) the mask's bounding box in the input frame, None if empty
    mask: np.ndarray  # the mask on the image grid (for sampled point prompts)
    input_size: tuple
    original_size: tuple


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
        apm = APM(spec.tap_channels, spec.image_size, tuple(cfg.apm_prompts or spec.apm_prompts),
                  default_slot_labels(cfg.n_points, cfg.n_positive), cfg.apm_fusion_dim, cfg.apm_head_blocks,
                  cfg.apm_tap_pool)
    ips = IPS() if cfg.use_ips else None
    if apm is None and ips is None:
        raise InputError("nothing to train: enable the APM and/or IPS")
    return Adapter(BackboneRecord.of(backbone), apm, ips, IntensityRule.from_dict(cfg.intensity), cfg.target_name,
                   tuple(cfg.target_color))


def mask_box(mask: np.ndarray, spec, original_size) -> Optional[torch.Tensor]:
    """The mask's bounding box (pixel edges, x0, y0, x1, y1) in the backbone's input frame."""
    b = mask_bbox(mask)
    if b is None:
        return None
    corners = spec.to_input_frame(np.array([[b[0], b[1]], [b[2] + 1, b[3] + 1]], float), original_size)
    return torch.as_tensor(corners.reshape(4), dtype=torch.float32)


class FeatureSource:
    """Encoded training images: computed per step (augmentation) or once and kept (fp16). With ``copies``
    K > 0 (and the cache) each image also has K augmented versions, each made from its own seed and
    encoded once when first drawn; every draw picks one of the 1 + K versions: augmentation at the cost
    of K extra encodes per image instead of one per step."""

    def __init__(self, engine: SamEngine, cases: List[Case], cache: bool, gen: torch.Generator, do_augment: bool,
                 apm: Optional[APM], copies: int = 0, seed: int = 0):
        self.engine, self.cases, self.gen, self.do_augment, self.apm = engine, cases, gen, do_augment, apm
        self.cache: Dict[int, Encoded] = {}  # the images as given
        self.copies: Dict[Tuple[int, int], Encoded] = {}  # (image, version 1..K): augmented versions
        self.use_cache = cache and not do_augment
        self.n_copies, self.seed = (copies if self.use_cache else 0), seed

    def item(self, i: int) -> Encoded:
        version = int(torch.randint(1 + self.n_copies, (), generator=self.gen)) if self.n_copies else 0
        if version:
            if (i, version) not in self.copies:
                own = torch.Generator().manual_seed(self.seed * 1_000_003 + i * 101 + version)
                self.copies[(i, version)] = self._encode(*augment(self.cases[i].rgb, self.cases[i].mask, own))
            return self.copies[(i, version)]
        if i in self.cache:
            return self.cache[i]
        rgb, mask = self.cases[i].rgb, self.cases[i].mask
        if self.do_augment:
            rgb, mask = augment(rgb, mask, self.gen)
        enc = self._encode(rgb, mask)
        if self.use_cache:
            self.cache[i] = enc
        return enc

    def _encode(self, rgb: np.ndarray, mask: np.ndarray) -> Encoded:
        emb = self.engine.encode([rgb])[0]
        taps = self.apm.prepare_taps(emb.taps) if (self.apm is not None and emb.taps) else []
        spec = self.engine.spec
        return Encoded(emb.features.half(), [t.half() for t in taps],
                       mask_to_low_res(mask, emb.input_size, spec.image_size)[0] > 0.5,
                       mask_box(mask, spec, emb.original_size), mask, emb.input_size, emb.original_size)

    def get(self, indices: Sequence[int]) -> List[Encoded]:
        return [self.item(i) for i in indices]


@dataclass
class Batch:
    features: torch.Tensor
    taps: List[torch.Tensor]
    target: torch.Tensor  # (B, 256, 256) float
    boxes: torch.Tensor  # (B, 4) ground-truth boxes (zeros where empty)
    present: torch.Tensor  # (B,) bool


def collate(items: List[Encoded], device) -> Batch:
    taps = [torch.cat([it.taps[k] for it in items]).to(device).float() for k in range(len(items[0].taps))]
    boxes = torch.stack([it.box if it.box is not None else torch.zeros(4) for it in items]).to(device)
    present = torch.tensor([it.box is not None for it in items], device=device)
    return Batch(torch.cat([it.features for it in items]).to(device).float(), taps,
                 torch.stack([it.target for it in items]).to(device).float(), boxes, present)


def flip_batch(batch: Batch, gen: torch.Generator, image_size: int) -> Batch:
    """The same random horizontal/vertical flip of a batch's taps, target and boxes, about the padded input
    square. Only for the APM alone: its head is translation-equivariant, while the frozen decoder never
    saw flipped embeddings."""
    taps, target, boxes = list(batch.taps), batch.target, batch.boxes.clone()
    for axis, (lo, hi) in ((-1, (0, 2)), (-2, (1, 3))):
        if bool(torch.rand((), generator=gen) < 0.5):
            taps, target = [t.flip(axis) for t in taps], target.flip(axis)
            boxes[:, [lo, hi]] = image_size - boxes[:, [hi, lo]]
    return Batch(batch.features, taps, target, boxes, batch.present)


def user_prompts(items: List[Encoded], batch: Batch, kind: str, rng: np.random.Generator, spec,
                 jitter: float = 0.0) -> PromptBatch:
    """Ground-truth prompts in the input frame: the mask's box (optionally jittered) or sampled points."""
    if kind == "box":
        boxes = batch.boxes.clone()
        if jitter:
            side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            noise = torch.as_tensor(rng.uniform(-jitter, jitter, boxes.shape), dtype=boxes.dtype, device=boxes.device)
            boxes = boxes + noise * side
        full = torch.tensor([0, 0, spec.image_size, spec.image_size], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.where(batch.present[:, None], boxes, full)  # an empty image: the whole image
        return PromptBatch(boxes=boxes)
    if kind == "points":
        pts, labels = [], []
        for it in items:
            p, lab = sample_points(it.mask, 3, 3, rng)
            pts.append(torch.as_tensor(spec.to_input_frame(p, it.original_size), dtype=torch.float32))
            labels.append(torch.as_tensor(lab))
        width = max(len(lab) for lab in labels)
        for k in range(len(pts)):  # pad to a common count with SAM's "not a point" label (-1)
            pad = width - len(labels[k])
            pts[k] = torch.cat([pts[k], torch.zeros(pad, 2)])
            labels[k] = torch.cat([labels[k], torch.full((pad,), -1, dtype=labels[k].dtype)])
        dev = batch.features.device
        return PromptBatch(torch.stack(pts).to(dev), torch.stack(labels).to(dev))
    return PromptBatch()


def lr_factor(cfg: TrainConfig, epoch: int, warmup: bool) -> float:
    """The share of ``lr`` for ``epoch``: 1 (constant), or a cosine from 1 over the epoch's phase."""
    if cfg.lr_schedule == "constant":
        return 1.0
    start, length = (0, cfg.apm_warmup_epochs) if warmup else (cfg.apm_warmup_epochs,
                                                                cfg.epochs - cfg.apm_warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / max(1, length)))


# Box refinements tried after training (steps, margin as a share of the box side); see ``choose_refinement``.
REFINEMENTS = ((0, 0.0), (1, 0.0), (1, 0.05), (1, 0.1), (1, 0.2), (2, 0.1))
REFINEMENT_GAIN = 0.002


class Trainer:
    """One training run: resume, epochs (APM warm-up, then joint), model selection, saving."""

    def __init__(self, engine: SamEngine, train: List[Case], val: List[Case], cfg: TrainConfig,
                 output: Optional[Path]):
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
        self.best, self.best_state, self.first_epoch = -1.0, None, 0
        self.refinement_scores: List[Dict[str, float]] = []
        self.train_src = FeatureSource(engine, train, cfg.cache_features, self.gen, cfg.augment, self.adapter.apm,
                                       cfg.augmented_copies, cfg.seed)
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
            raise InputError(f"{self.state_path} was written on backbone weights {st['backbone']}, now "
                             f"{self.engine.backbone.identity}: resume with the same --backbone")
        try:
            for name, m in self.adapter.modules().items():
                m.load_state_dict(st["modules"][name])
            self.optim.load_state_dict(st["optim"])
            self.gen.set_state(st["generator"])
        except Exception as exc:
            raise InputError(f"{self.state_path} is damaged ({type(exc).__name__}); delete it or start again "
                             f"with --overwrite") from None
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
                loss = apm_aux_loss(self.adapter.apm(batch.taps, prepared=True), batch, spec.image_size)
            else:
                user = user_prompts(items, batch, cfg.user_prompt, self.rng, spec, jitter=0.05)
                out = promise_forward(self.engine.backbone, self.adapter, batch.features, batch.taps, user, cfg.mode,
                                      taps_prepared=True)
                loss = seg_loss(out.low_res[:, 0].float(), batch.target)
                if cfg.box_loss_weight and out.apm is not None:
                    loss = loss + cfg.box_loss_weight * apm_aux_loss(out.apm, batch, spec.image_size)
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        return float(loss.item())

    def epoch(self, epoch: int, cancel: Optional[Callable[[], bool]]) -> Dict[str, float]:
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
            losses.append(self.step(self.train_src.get(order[b:b + self.cfg.batch_size]), warmup))
        val_dice, val_box_iou = self.validate() if self.val else (float("nan"), float("nan"))
        return {"epoch": epoch, "phase": "apm warm-up" if warmup else "joint", "loss": float(np.mean(losses)),
                "val_dice": val_dice, "val_box_iou": val_box_iou, "seconds": time.time() - started}

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
            out = promise_forward(self.engine.backbone, self.adapter, batch.features, batch.taps, user, self.cfg.mode,
                                  taps_prepared=True)
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
            out = promise_forward(self.engine.backbone, self.adapter, batch.features, batch.taps, PromptBatch(),
                                  "apm+ips", taps_prepared=True)
            for steps, margin in REFINEMENTS:
                refined = refine_boxes(self.engine.backbone, self.adapter, batch.features, out,
                                       [it.input_size for it in items], self.engine.mask_threshold, steps, margin)
                scores[(steps, margin)] += batch_dice(refined.low_res[:, 0].float(), batch.target)
        means = {c: float(np.mean(v)) for c, v in scores.items()}
        best = max(REFINEMENTS, key=lambda c: means[c] - (REFINEMENT_GAIN if c[0] else 0.0))
        apm.set_refinement(*best)
        log.info("box refinement %s (validation Dice %s)", best, means)
        return [{"steps": steps, "margin": margin, "val_dice": d} for (steps, margin), d in means.items()]

    def snapshot(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {n: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                for n, m in self.adapter.modules().items()}

    def final_adapter(self) -> Adapter:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()}
        a = self.adapter
        a.training = {"train_cases": len(self.train), "val_cases": len(self.val), "epochs": len(self.history),
                      "best_val_dice": self.best, "mode": self.cfg.mode, "config": cfg,
                      "seconds_per_epoch": float(np.mean([h["seconds"] for h in self.history])) if self.history else 0}
        if self.refinement_scores:
            a.training["box_refinement_val_dice"] = self.refinement_scores
        return a

    def save_state(self, epoch: int) -> None:
        state = {"modules": {n: m.state_dict() for n, m in self.adapter.modules().items()},
                 "optim": self.optim.state_dict(), "generator": self.gen.get_state(), "history": self.history,
                 "best": self.best, "epoch": epoch, "best_modules": self.best_state,
                 "config": resume_config(self.cfg), "cases": [len(self.train), len(self.val)],
                 "backbone": self.engine.backbone.identity, "data": self.data}
        write_atomically(self.state_path, lambda tmp: torch.save(state, tmp), verify=_check_zip)

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
        for name, m in self.adapter.modules().items():
            m.load_state_dict(self.best_state[name])
        apm = self.adapter.apm
        if self.val and self.cfg.mode == "apm+ips" and apm is not None and apm.box_head is not None:
            self.refinement_scores = self.choose_refinement()
        adapter = self.final_adapter().eval()
        if self.output:
            save_adapter(adapter, self.output)
            self.state_path.unlink(missing_ok=True)  # finished: the resumable state is only for interrupted runs
        return TrainResult(adapter, self.history, self.best, time.time() - start)


def check_training_cases(train: List[Case], val: List[Case]) -> None:
    """Refuse a training set nothing can be learnt from (before the backbone is loaded)."""
    if not train:
        raise InputError(f"no training cases ({len(val)} went to validation): give more images, or a "
                         f"smaller --val-fraction")
    if not any(c.mask.any() for c in train):
        raise InputError(f"every training mask is empty ({len(train)} cases): there is nothing to learn (check "
                         f"the label value or the mask files)")
    if all(c.mask.all() for c in train):
        raise InputError(f"every training mask covers its whole image ({len(train)} cases): nothing tells the "
                         f"target from its surroundings (check the label value or the mask files)")


def case_digests(cases: Sequence[Case]) -> List[str]:
    """SHA-256 of each case's name, image and mask (shapes, types, pixels as decoded), in order: how a resumed
    run knows its data are the interrupted run's (the same number of other cases would pass a count)."""
    digests = []
    for c in cases:
        rgb, mask = np.ascontiguousarray(c.rgb), np.ascontiguousarray(c.mask)
        h = hashlib.sha256(json.dumps([c.id, rgb.shape, rgb.dtype.str, mask.shape, mask.dtype.str]).encode())
        h.update(rgb.data)
        h.update(mask.data)
        digests.append(h.hexdigest())
    return digests


def data_fingerprint(train: Sequence[Case], val: Sequence[Case]) -> Dict[str, List[str]]:
    return {"train": case_digests(train), "val": case_digests(val)}


def resume_config(cfg: TrainConfig) -> Dict:
    """The options a resumed run must share with the interrupted one (plain lists, comparable after saving)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
            if k not in RESUMABLE_CHANGES}


def read_resume_state(path: Path, cfg: TrainConfig, cases: Optional[Sequence] = None) -> Dict:
    """An interrupted run's state; ``InputError`` if it is damaged, was written with other options or for more
    epochs than ``cfg`` has, or (``cases``: the training and validation cases, or only their counts) for other
    data; the message says what differs. Needs no backbone: the command line calls it before loading one."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path} is damaged (truncated or not a training state: {type(exc).__name__}); delete "
                         f"it or start again with --overwrite") from None
    missing = [k for k in STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise InputError(f"{path} is damaged or from an older PromiseSegment (it lacks {', '.join(missing)}); "
                         f"start again with --overwrite")
    if not (isinstance(st["config"], dict) and type(st["epoch"]) is int and isinstance(st["cases"], (list, tuple))):
        raise InputError(f"{path} is damaged (its options, epoch or case counts are unreadable); start again with "
                         f"--overwrite")
    _check_options(path, st, cfg)
    if cases is not None:
        _check_data(path, st, cases)
    return st


def _check_options(path: Path, st: Dict, cfg: TrainConfig) -> None:
    now = resume_config(cfg)
    diffs = [f"{OPTION_NAMES.get(k, k)} {st['config'].get(k)!r} then, {now.get(k)!r} now"
             for k in sorted(set(now) | set(st["config"])) if st["config"].get(k) != now.get(k)]
    if diffs:
        raise InputError(f"{path} was written with other options ({'; '.join(diffs)}): resume with the same "
                         f"options, or start again with --overwrite")
    done = st["epoch"] + 1
    if cfg.epochs < done:
        raise InputError(f"{path}: the interrupted run has already trained {done} epochs, more than --epochs "
                         f"{cfg.epochs}: resume with --epochs {done} or more, or start again with --overwrite")


def _check_data(path: Path, st: Dict, cases: Sequence) -> None:
    """Counts, then (given the cases themselves) each case's digest against the interrupted run's."""
    counts = [c if isinstance(c, int) else len(c) for c in cases]
    if list(st["cases"]) != counts:
        raise InputError(f"{path} was written for {st['cases'][0]} training and {st['cases'][1]} validation cases, "
                         f"now there are {counts[0]} and {counts[1]}: resume with the same data, or start again "
                         f"with --overwrite")
    if isinstance(cases[0], int):
        return
    data = st["data"]
    if not (isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("train", "val"))
            and [len(data["train"]), len(data["val"])] == counts):
        raise InputError(f"{path} is damaged (its data fingerprint is unreadable); start again with --overwrite")
    for what, key, now in (("training", "train", cases[0]), ("validation", "val", cases[1])):
        changed = sum(a != b for a, b in zip(data[key], case_digests(now)))
        if changed:
            raise InputError(f"{path}: the {what} data differ from the interrupted run's ({changed} of {len(now)} "
                             f"cases changed): resume with the same data, or remove --resume and start again "
                             f"with --overwrite")


def _check_zip(tmp: str) -> None:
    import zipfile

    with zipfile.ZipFile(tmp) as z:
        bad = z.testzip()
    if bad is not None:
        raise OSError(f"{tmp}: {bad} does not read back")


def train_adapter(engine: SamEngine, train: List[Case], val: List[Case], cfg: TrainConfig,
                  output: Optional[Path] = None, resume: bool = False,
                  progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
                  cancel: Optional[Callable[[], bool]] = None) -> TrainResult:
    """Train on ``train``, select the epoch with the best Dice on ``val``; writes ``output`` (best adapter)
    and ``output.state.pt`` (resumable state, every epoch, atomically) when ``output`` is given."""
    return Trainer(engine, train, val, cfg, output).run(resume, progress, cancel)
