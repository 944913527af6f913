"""Segment a volume slice by slice, streaming: only ``model.batch_size`` slices are in flight.

Like MONAI's ``SliceInferer``, the loop takes any 2D model with two calls - ``encode(images)`` and
``predict(embedding, prompts, output_size)`` (``SliceModel``): the plain backbone (``PlainBackbone``) or a
ProMISe model fixed to one mode (``promise.ModelInMode``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from PromiseSegmentLib.callbacks import CancelFn, ProgressFn
from PromiseSegmentLib.data.preprocessing import (
    IntensityRule,
    SliceGeometry,
    check_volume,
    put_slice,
    resolve_axis,
    slice_geometry,
    take_slice,
    to_uint8_rgb,
)
from PromiseSegmentLib.data.prompts import Prompts, mask_box
from PromiseSegmentLib.errors import Cancelled, InputError
from PromiseSegmentLib.inference.engine import ImageEmbedding, InferenceEngine, Prediction


class SliceModel(Protocol):
    """What the volume loop needs from a model: images (H, W, 3 uint8, square pixels) -> embeddings, then
    one embedding + prompts in that image's pixels -> a ``Prediction`` at ``output_size``."""

    @property
    def batch_size(self) -> int: ...

    def encode(self, images: Sequence[np.ndarray], cancel=None) -> List[ImageEmbedding]: ...

    def predict(self, emb: ImageEmbedding, prompts: Prompts, output_size: Tuple[int, int]) -> Prediction: ...

    def mask_to_prompt(self, emb: ImageEmbedding, mask: np.ndarray): ...


class PlainBackbone:
    """The frozen backbone alone as a ``SliceModel`` (no adapter): prompts are required."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    def encode(self, images, cancel=None):
        return self.engine.encode(images, cancel=cancel)

    def predict(self, emb, prompts, output_size):
        return vanilla_predict(self.engine, emb, prompts, output_size)

    def mask_to_prompt(self, emb, mask):
        return self.engine.mask_to_prompt(emb, mask)


def as_slice_model(model: Union[InferenceEngine, SliceModel]) -> SliceModel:
    """A bare engine means the plain backbone."""
    return PlainBackbone(model) if isinstance(model, InferenceEngine) else model


def vanilla_predict(
    engine: InferenceEngine, emb: ImageEmbedding, prompts: Prompts, output_size: Tuple[int, int]
) -> Prediction:
    """The plain backbone. SAM ViT: a single click is ambiguous, so the best of 3 masks; otherwise one."""
    if prompts.empty:
        raise InputError(
            "vanilla SAM needs prompts (points or a box) on every slice it segments; "
            "use an adapter for automatic prompts"
        )
    n_points = 0 if prompts.points is None else len(prompts.points)
    multimask = engine.spec.vanilla_multimask(n_points, prompts.box is not None)
    pred = engine.predict(emb, prompts, multimask_output=multimask, output_size=output_size)
    b = pred.best()
    return Prediction(
        pred.masks[b : b + 1],
        pred.logits[b : b + 1],
        pred.iou[b : b + 1],
        pred.low_res[b : b + 1],
        pred.points,
        pred.labels,
        prompts.box,
    )


def _to_square_prompts(geom, prompts: Prompts) -> Prompts:
    if geom.is_identity:
        return prompts
    return Prompts(
        points=None if prompts.points is None else geom.points_to_square(prompts.points),
        labels=prompts.labels,
        box=None if prompts.box is None else geom.box_to_square(prompts.box),
        mask_logits=prompts.mask_logits,
    )


def slice_indices(n: int, slice_range: Optional[Tuple[int, int]]) -> range:
    """Inclusive (first, last) range, clipped to the volume; None means all slices."""
    if slice_range is None:
        return range(n)
    first, last = slice_range
    if first < 0 or last >= n or first > last:
        raise InputError(f"slice range {first}..{last} is outside 0..{n - 1}")
    return range(first, last + 1)


def volume_value_range(volume: np.ndarray, intensity: Optional[IntensityRule]) -> Tuple[float, float]:
    return (intensity or IntensityRule()).value_range(volume)


@dataclass(frozen=True)
class SliceImage:
    """One slice as SAM sees it: ``image`` uint8 RGB on square pixels, and the ``geometry`` that maps
    prompts and masks between it and the slice's native grid."""

    geometry: SliceGeometry
    image: np.ndarray


def slice_image(
    volume: np.ndarray, ijk_to_ras: np.ndarray, ax: int, index: int, value_range: Tuple[float, float]
) -> SliceImage:
    """Slice ``index`` along ``ax`` as the uint8 RGB image SAM sees (square pixels) and its geometry."""
    native = take_slice(volume, ax, index)
    geom = slice_geometry(ijk_to_ras, ax, native.shape)
    return SliceImage(geom, geom.image_to_square(to_uint8_rgb(native, value_range)))


def segment_slice(
    model: Union[InferenceEngine, SliceModel],
    volume: np.ndarray,
    ijk_to_ras: np.ndarray,
    axis: Union[int, str],
    index: int,
    prompts: Optional[Prompts] = None,
    previous_mask: Optional[np.ndarray] = None,
    intensity: Optional[IntensityRule] = None,
    value_range: Optional[Tuple[float, float]] = None,
) -> Prediction:
    """One slice. ``prompts`` are in the slice's own pixels; ``previous_mask`` (same grid, e.g. the
    neighbouring slice's result during propagation) is fed to SAM as a mask prompt. The returned
    masks are on the native slice grid; pass ``value_range`` to reuse a per-volume intensity mapping."""
    model = as_slice_model(model)
    volume = check_volume(volume)
    ax = resolve_axis(axis, ijk_to_ras)
    slice_indices(volume.shape[ax], (index, index))
    vr = value_range or volume_value_range(volume, intensity)
    picture = slice_image(volume, ijk_to_ras, ax, index, vr)
    geom, emb = picture.geometry, model.encode([picture.image])[0]
    p = _to_square_prompts(geom, prompts or Prompts())
    if previous_mask is not None:
        p = Prompts(p.points, p.labels, p.box, model.mask_to_prompt(emb, geom.mask_to_square(previous_mask)))
    return model.predict(emb, p, geom.native_shape)


def segment_volume(
    model: Union[InferenceEngine, SliceModel],
    volume: np.ndarray,
    ijk_to_ras: np.ndarray,
    *,
    axis: Union[int, str] = "K",
    slice_range: Optional[Tuple[int, int]] = None,
    prompts: Optional[Dict[int, Prompts]] = None,
    intensity: Optional[IntensityRule] = None,
    automatic: bool = False,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    value_range: Optional[Tuple[float, float]] = None,
    box_propagation: bool = False,
) -> np.ndarray:
    """Segment ``volume`` (KJI[×3]) slice by slice; returns a uint8 KJI mask on the volume's own grid.

    ``prompts`` maps slice index -> prompts in that slice's pixels (x = column, y = row). Without
    ``automatic`` only prompted slices are segmented; with it (a model with an APM) every slice in range.
    ``box_propagation`` (box-trained backbones, as LiteMedSAM's reference 3D inference): a box given on a
    run of consecutive slices is used as given on the run's middle slice only; the run is then segmented
    middle-out, each slice prompted with the previous slice's result box + 3 px (the middle box where
    that result is empty). Raises ``Cancelled`` when ``cancel()`` turns true; nothing is returned then.
    """
    model = as_slice_model(model)
    volume = check_volume(volume)
    ax = resolve_axis(axis, ijk_to_ras)
    prompts = prompts or {}
    todo = [s for s in slice_indices(volume.shape[ax], slice_range) if automatic or s in prompts]
    if not todo:
        raise InputError("no slice to segment: give prompts on at least one slice in range, or use an adapter")
    vr = value_range or volume_value_range(volume, intensity)
    out = np.zeros(volume.shape[:3], np.uint8)
    parents = box_parents(todo, prompts) if box_propagation and not automatic else {}
    if parents:
        todo = list(parents)  # middle-out: each slice after the one it takes its box from
    step, done = (1 if parents else model.batch_size), 0
    for start in range(0, len(todo), step):
        if cancel is not None and cancel():
            raise Cancelled()
        batch = todo[start : start + step]
        prepared = [slice_image(volume, ijk_to_ras, ax, s, vr) for s in batch]
        embeddings = model.encode([p.image for p in prepared], cancel=cancel)
        masks = _batch_masks(model, batch, prepared, embeddings, automatic, prompts, parents, out, ax)
        for s, mask in zip(batch, masks):
            put_slice(out, ax, s, mask.astype(np.uint8))
            done += 1
            if progress:
                progress(done, len(todo))
    return out


def _batch_masks(model, batch, prepared, embeddings, automatic, prompts, parents, out, ax) -> List[np.ndarray]:
    """The masks of one batch of slices: unprompted slices of an automatic run decoded together, the others
    one by one with their prompts (a box-propagated slice with the box of the result it follows)."""
    unprompted = [s for s in batch if automatic and s not in prompts]
    together = [e for s, e in zip(batch, embeddings) if s in unprompted]
    batched = _automatic_masks(model, together, prepared[0].geometry.native_shape)
    masks = []
    for s, picture, emb in zip(batch, prepared, embeddings):
        g = picture.geometry
        if batched is not None and s in unprompted:
            masks.append(batched[unprompted.index(s)])
        else:
            p = _to_square_prompts(g, _slice_prompts(s, prompts, parents, out, ax))
            masks.append(model.predict(emb, p, g.native_shape).masks[0])
    return masks


def _slice_prompts(s: int, prompts: Dict[int, Prompts], parents, out: np.ndarray, ax: int) -> Prompts:
    """Slice ``s``'s prompts: its own, or in box propagation its parent's result box + margin (the run's
    middle box where that result is empty)."""
    if parents.get(s) is None:
        return prompts.get(s, Prompts())
    parent, middle = parents[s]
    previous = take_slice(out, ax, parent)
    return Prompts(box=mask_box(previous, PROPAGATION_MARGIN) if previous.any() else prompts[middle].box)


def _automatic_masks(model: SliceModel, embeddings: List[ImageEmbedding], output_size) -> Optional[np.ndarray]:
    """Masks of unprompted slices in one batch from a model that can (``predict_masks``), else None."""
    batched = getattr(model, "predict_masks", None)
    return batched(embeddings, output_size) if embeddings and batched is not None else None


PROPAGATION_MARGIN = 3  # px added around the previous slice's result box (LiteMedSAM's reference)


def propagation_margin(box_only: bool) -> int:
    """Pixels added around the previous slice's result box: box-only backbones follow their reference
    (+3 px, no mask prompt); backbones that also take the previous mask as a prompt need only +1."""
    return PROPAGATION_MARGIN if box_only else 1


def box_parents(todo, prompts: Dict[int, Prompts]) -> Dict[int, Optional[Tuple[int, int]]]:
    """Middle-out order for runs of consecutive slices prompted by a box alone: slice -> (the slice its box
    comes from, the run's middle slice), or None for slices that use their own prompts. Insertion order is
    the processing order."""
    boxed = [s for s in todo if s in prompts and prompts[s].box is not None and prompts[s].points is None]
    runs: List[List[int]] = []
    order: Dict[int, Optional[Tuple[int, int]]] = {}
    for s in boxed:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    for run in runs:
        m = len(run) // 2
        order[run[m]] = None
        for k in range(m + 1, len(run)):
            order[run[k]] = (run[k - 1], run[m])
        for k in range(m - 1, -1, -1):
            order[run[k]] = (run[k + 1], run[m])
    for s in todo:
        order.setdefault(s, None)
    return order
