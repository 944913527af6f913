"""Training an APM/IPS adapter on a frozen SAM (loss: BCE + soft Dice on the first multimask
output at 256x256). SAM is frozen and checked bit-identical after training."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import Adapter, save_adapter
from .apm import APM, RESNET34_BLOCKS, default_slot_labels
from .augment import augment
from .datasets import Case, sample_points
from .engine import Cancelled, SamEngine, mask_to_low_res
from .ips import IPS
from .paths import write_atomically
from .preprocessing import IntensityRule
from .promise import promise_low_res
from .sam_models import ARCHITECTURES

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 8
    lr: float = 1e-5
    seed: int = 0
    augment: bool = True
    cache_features: bool = False  # encode once (fp16); only without augmentation
    use_apm: bool = True
    use_ips: bool = True
    n_points: int = 16
    n_positive: int = 8
    apm_fusion_dim: int = 256
    apm_head_blocks: Sequence[int] = RESNET34_BLOCKS
    gt_points: int = 0  # >0: prompt with this many positive + negative points sampled from the truth (no APM)
    bf16: bool = True  # CUDA autocast; ignored on CPU
    target_name: str = "Segment"
    target_color: Sequence[float] = (0.9, 0.3, 0.2)
    intensity: Dict = field(default_factory=lambda: IntensityRule().to_dict())


@dataclass
class TrainResult:
    adapter: Adapter
    history: List[Dict[str, float]]
    best_val_dice: float
    seconds: float


def sam_fingerprint(sam) -> str:
    h = hashlib.sha256()
    for k, v in sorted(sam.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_adapter(cfg: TrainConfig, variant: str, identity: str) -> Adapter:
    torch.manual_seed(cfg.seed)
    apm = (APM(ARCHITECTURES[variant].embed_dim, default_slot_labels(cfg.n_points, cfg.n_positive),
               cfg.apm_fusion_dim, cfg.apm_head_blocks) if cfg.use_apm and not cfg.gt_points else None)
    ips = IPS() if cfg.use_ips else None
    if apm is None and ips is None:
        raise ValueError("nothing to train: enable the APM and/or IPS")
    return Adapter(variant, identity, apm, ips, IntensityRule.from_dict(cfg.intensity), cfg.target_name,
                   tuple(cfg.target_color))


def low_res_target(engine: SamEngine, mask: np.ndarray, input_size) -> torch.Tensor:
    """Ground truth in the decoder's 256x256 frame (resized like the image, padded, area-averaged)."""
    return mask_to_low_res(mask, input_size, engine.sam.image_encoder.img_size)[0] > 0.5


class FeatureSource:
    """Encoder outputs for cases: computed per step (augmentation) or once and cached (fp16)."""

    def __init__(self, engine: SamEngine, cases: List[Case], cache: bool, gen: torch.Generator, do_augment: bool):
        self.engine, self.cases, self.gen, self.do_augment = engine, cases, gen, do_augment
        self.cache: Dict[int, tuple] = {}
        self.use_cache = cache and not do_augment

    def get(self, indices: Sequence[int]):
        feats, interm, targets, items = [], [], [], []
        for i in indices:
            if i in self.cache:
                item = self.cache[i]
            else:
                rgb, mask = self.cases[i].rgb, self.cases[i].mask
                if self.do_augment:
                    rgb, mask = augment(rgb, mask, self.gen)
                emb = self.engine.encode([rgb])[0]
                item = (emb.features.half(), [t.half() for t in emb.interm or []],
                        low_res_target(self.engine, mask, emb.input_size), mask, emb.input_size, emb.original_size)
                if self.use_cache:
                    self.cache[i] = item
            feats.append(item[0]), interm.append(item[1]), targets.append(item[2]), items.append(item)
        dev = self.engine.device
        f = torch.cat(feats).to(dev).float()
        blocks = [torch.cat([b[k] for b in interm]).to(dev).float() for k in range(len(interm[0]))] if interm[0] else []
        return f, blocks, torch.stack(targets).to(dev).float(), items


def gt_prompt_tensors(items, n: int, rng: np.random.Generator, device):
    pts, labels = [], []
    for item in items:
        mask, input_size, original = item[3], item[4], item[5]
        p, l = sample_points(mask, n, n, rng)
        scale = np.array([input_size[1] / original[1], input_size[0] / original[0]])
        pts.append(torch.as_tensor(p * scale, dtype=torch.float32)), labels.append(torch.as_tensor(l))
    width = max(len(l) for l in labels)
    for k in range(len(pts)):  # pad to a common count with SAM's "not a point" label (-1)
        pad = width - len(labels[k])
        pts[k] = torch.cat([pts[k], torch.zeros(pad, 2)])
        labels[k] = torch.cat([labels[k], torch.full((pad,), -1, dtype=labels[k].dtype)])
    return torch.stack(pts).to(device), torch.stack(labels).to(device)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def batch_dice(logits: torch.Tensor, target: torch.Tensor) -> List[float]:
    p, t = (logits > 0).flatten(1).float(), target.flatten(1)
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    return [1.0 if float(s) == 0 else float(2 * i / s) for i, s in zip(inter, total)]


def _atomic_torch_save(obj, path: Path) -> None:
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def train_adapter(engine: SamEngine, variant: str, identity: str, train: List[Case], val: List[Case],
                  cfg: TrainConfig, output: Optional[Path] = None, resume: bool = False,
                  progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
                  cancel: Optional[Callable[[], bool]] = None) -> TrainResult:
    """Train on ``train``, select the epoch with the best Dice on ``val``; writes ``output`` (best adapter)
    and ``output.state.pt`` (resumable state, every epoch, atomically) when ``output`` is given."""
    if not train:
        raise ValueError("no training cases")
    start = time.time()
    torch.manual_seed(cfg.seed)
    adapter = build_adapter(cfg, variant, identity).to(engine.device)
    if adapter.apm is not None:
        engine.capture_blocks = ARCHITECTURES[variant].apm_blocks
    params = [p for m in adapter.modules().values() for p in m.parameters()]
    optim = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    sam_before = sam_fingerprint(engine.sam)
    assert not any(p.requires_grad for p in engine.sam.parameters()), "SAM must be frozen"
    history: List[Dict[str, float]] = []
    best, best_state, first_epoch = -1.0, None, 0
    state_path = Path(str(output) + ".state.pt") if output else None
    if resume and state_path and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        for name, m in adapter.modules().items():
            m.load_state_dict(st["modules"][name])
        optim.load_state_dict(st["optim"])
        gen.set_state(st["generator"])
        history, best, first_epoch = st["history"], st["best"], st["epoch"] + 1
        best_state = st["best_modules"]
        log.info("resumed from %s at epoch %d", state_path, first_epoch)
    train_src = FeatureSource(engine, train, cfg.cache_features, gen, cfg.augment)
    val_src = FeatureSource(engine, val, True, gen, False)
    rng = np.random.default_rng(cfg.seed)
    use_autocast = engine.device.type == "cuda" and cfg.bf16
    for epoch in range(first_epoch, cfg.epochs):
        for m in adapter.modules().values():
            m.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        losses = []
        for b in range(0, len(order), cfg.batch_size):
            if cancel is not None and cancel():
                raise Cancelled()
            feats, blocks, target, items = train_src.get(order[b:b + cfg.batch_size])
            pts = lab = None
            if cfg.gt_points:
                pts, lab = gt_prompt_tensors(items, cfg.gt_points, rng, engine.device)
            with torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=use_autocast):
                logits = promise_low_res(engine.sam, adapter, feats, blocks, pts, lab)
            loss = seg_loss(logits.float(), target)
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(loss.item())
        val_dice = evaluate_low_res(engine, adapter, val_src, len(val), cfg, rng) if val else float("nan")
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": val_dice}
        history.append(row)
        if not val or val_dice > best:
            best = val_dice
            best_state = {n: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                          for n, m in adapter.modules().items()}
            if output:
                _finalise(adapter, best_state, cfg, train, val, history, best, output)
        if state_path:
            _atomic_torch_save({"modules": {n: m.state_dict() for n, m in adapter.modules().items()},
                                "optim": optim.state_dict(), "generator": gen.get_state(), "history": history,
                                "best": best, "epoch": epoch, "best_modules": best_state}, state_path)
        if progress:
            progress(epoch + 1, cfg.epochs, row)
    for name, m in adapter.modules().items():
        m.load_state_dict(best_state[name])
    if sam_fingerprint(engine.sam) != sam_before:
        raise RuntimeError("SAM's weights changed during training; this is a bug")
    result = _finalise(adapter, best_state, cfg, train, val, history, best, output)
    return TrainResult(result, history, best, time.time() - start)


def _finalise(adapter, best_state, cfg, train, val, history, best, output) -> Adapter:
    final = Adapter(adapter.sam_variant, adapter.sam_identity, adapter.apm, adapter.ips, adapter.intensity,
                    adapter.target_name, adapter.target_color,
                    {"train_cases": len(train), "val_cases": len(val), "epochs": len(history),
                     "best_val_dice": best, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in asdict(cfg).items()}})
    if output:
        current = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in adapter.modules().items()}
        for name, m in adapter.modules().items():
            m.load_state_dict(best_state[name])
        save_adapter(final, output)
        for name, m in adapter.modules().items():
            m.load_state_dict(current[name])
    return final.eval()


@torch.no_grad()
def evaluate_low_res(engine, adapter, src: FeatureSource, n: int, cfg: TrainConfig, rng) -> float:
    """Mean Dice in the 256x256 decoder frame (fast model selection; final metrics use full resolution)."""
    for m in adapter.modules().values():
        m.eval()
    scores = []
    for b in range(0, n, cfg.batch_size):
        feats, blocks, target, items = src.get(range(b, min(n, b + cfg.batch_size)))
        pts = lab = None
        if cfg.gt_points:
            pts, lab = gt_prompt_tensors(items, cfg.gt_points, np.random.default_rng(b), engine.device)
        scores += batch_dice(promise_low_res(engine.sam, adapter, feats, blocks, pts, lab).float(), target)
    return float(np.mean(scores))
