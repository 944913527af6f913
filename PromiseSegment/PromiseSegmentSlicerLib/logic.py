"""``PromiseSegmentLogic``: ProMISe on Slicer's MRML nodes, with no Qt (console, batch scripts, the
module widget and the Segment Editor effect all call this; pytest runs it on ``slicer-core``).

Results are computed completely before the scene is touched and then written in one call, so a
cancelled or failed run leaves every segment as it was.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from PromiseSegmentLib.adapter import Adapter, load_adapter, read_metadata
from PromiseSegmentLib.backbone import LoadedBackbone, load_backbone
from PromiseSegmentLib.cli import ijk_prompts  # IJK voxel prompts, exactly as on the command line
from PromiseSegmentLib.embedding_cache import EmbeddingCache
from PromiseSegmentLib.engine import Prompts
from PromiseSegmentLib.preprocessing import InputError, IntensityRule, mask_bbox, resolve_axis, take_slice
from PromiseSegmentLib.promise import ProMISeModel, engine_for
from PromiseSegmentLib.volume_segmentation import slice_indices, volume_value_range

from . import mrml

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
PointList = Sequence[Sequence[float]]  # IJK voxels (i, j, k[, label]); boxes are (i0, j0, k0, i1, j1, k1)


class PromiseSegmentLogic:
    """Console API. One SAM is kept in memory and reused across calls (re-loaded only when another
    checkpoint or device is asked for); encoder outputs are cached by slice content, so a repeated run,
    or a click on an already-encoded slice, re-runs the decoder only."""

    def __init__(self, embeddingCacheBytes: int = 1 << 30, backbone: Optional[str] = None):
        """``backbone``: used when a call names none and its adapter does not say (default LiteMedSAM)."""
        self.defaultBackbone = backbone
        self.embeddingCache = EmbeddingCache(embeddingCacheBytes)
        self._backbone: Optional[LoadedBackbone] = None
        self._backboneKey: Optional[tuple] = None
        self._adapters: Dict[tuple, Adapter] = {}
        self._value_ranges: Dict[tuple, Tuple[float, float]] = {}

    # ------------------------------------------------------------------ models
    def loadBackbone(self, backbone: Optional[str] = None, expected: Optional[str] = None,
                     device: Optional[str] = None) -> LoadedBackbone:
        """The frozen backbone (registry name, e.g. "lite_medsam" - the default - or "sam_vit_b", or a
        checkpoint path), kept in memory until another one is asked for."""
        backbone = backbone or (None if expected else self.defaultBackbone)
        key = (str(backbone or expected or "default"), str(device))
        if self._backbone is None or self._backboneKey != key or (
                expected and self._backbone.spec.family != load_family(expected)):
            self._backbone = None  # release the old model before loading a new one
            self.embeddingCache.clear()
            self._backbone, self._backboneKey = load_backbone(backbone or expected, expected), key
        return self._backbone

    def loadModel(self, backbone: Optional[str] = None, adapter: Union[None, str, Adapter] = None,
                  device: Optional[str] = None, allowMismatch: bool = False) -> ProMISeModel:
        """Backbone (``None``: the adapter's, else LiteMedSAM; a registry name or a checkpoint path) plus an
        optional adapter (file path or an ``Adapter``). An adapter's metadata is checked before any
        weights are loaded."""
        expected = None
        if isinstance(adapter, (str, os.PathLike)):
            expected = read_metadata(adapter)["backbone"]["name"]
        elif isinstance(adapter, Adapter):
            expected = adapter.backbone.name
        loaded = self.loadBackbone(backbone, expected, device)
        adapterObject = None
        if isinstance(adapter, Adapter):
            adapterObject = adapter
        elif adapter:
            path = Path(adapter)
            akey = (str(path.resolve()), path.stat().st_mtime_ns, loaded.name, loaded.identity, allowMismatch)
            if akey not in self._adapters:
                self._adapters = {akey: load_adapter(path, loaded, allowMismatch)}
            adapterObject = self._adapters[akey]
        return ProMISeModel(engine_for(loaded, adapterObject, device, cache=self.embeddingCache), adapterObject)

    def _model(self, model: Optional[ProMISeModel], **kwargs) -> ProMISeModel:
        return model if model is not None else self.loadModel(**kwargs)

    def valueRange(self, volumeNode, array: np.ndarray, intensity: IntensityRule) -> Tuple[float, float]:
        """Per-volume intensity mapping, memoised while the voxels are unchanged (percentiles of a
        512x512x300 volume take about a second; clicks should not pay that each time)."""
        image = volumeNode.GetImageData()
        key = (volumeNode.GetID(), image.GetMTime(), tuple(sorted(intensity.to_dict().items())))
        if key not in self._value_ranges:
            self._value_ranges = {k: v for k, v in self._value_ranges.items() if k[0] != key[0]}
            self._value_ranges[key] = volume_value_range(array, intensity)
        return self._value_ranges[key]

    # ------------------------------------------------------------------ inference
    def segmentSlice(self, volumeNode, sliceIndex: int, axis: Union[int, str] = "K", points: PointList = (),
                     box: Optional[Sequence[float]] = None, previousMask: Optional[np.ndarray] = None,
                     mode: str = "auto", model: Optional[ProMISeModel] = None,
                     intensity: Optional[IntensityRule] = None, **modelArgs) -> np.ndarray:
        """One slice -> bool mask on that slice's grid (rows, cols as ``take_slice`` gives them).

        ``points`` are IJK voxels (i, j, k[, label]) on this slice (label 1 positive, 0 negative);
        ``box`` is (i0, j0, k0, i1, j1, k1); ``previousMask`` a neighbouring slice's result used as a
        mask prompt (propagation)."""
        model = self._model(model, **modelArgs)
        array = mrml.volume_array(volumeNode)
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode)
        ax = resolve_axis(axis, ijk_to_ras)
        per_slice = ijk_prompts(ax, [p for p in points], [box] if box is not None else [], array.shape)
        stray = sorted(set(per_slice) - {sliceIndex})
        if stray:
            raise InputError(f"prompts on slice(s) {stray}, not on slice {sliceIndex}")
        vr = self.valueRange(volumeNode, array, intensity or model.intensity)
        pred = model.segment_slice(array, ijk_to_ras, ax, sliceIndex, per_slice.get(sliceIndex), previousMask,
                                   mode, vr)
        return pred.masks[0].astype(bool)

    def predictVolume(self, volumeNode, axis: Union[int, str] = "K", sliceRange: Optional[Tuple[int, int]] = None,
                      points: PointList = (), boxes: Sequence[Sequence[float]] = (), mode: str = "auto",
                      progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                      model: Optional[ProMISeModel] = None, intensity: Optional[IntensityRule] = None,
                      segmentationNode=None, **modelArgs) -> np.ndarray:
        """The whole (or ``sliceRange`` of the) volume -> KJI uint8 mask; the scene is not touched.
        Slices are streamed, so memory is the volume plus one mask, not a stack of embeddings."""
        model = self._model(model, **modelArgs)
        array = mrml.volume_array(volumeNode)
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode, segmentationNode)
        ax = resolve_axis(axis, ijk_to_ras)
        prompts = ijk_prompts(ax, points, boxes, array.shape)
        vr = self.valueRange(volumeNode, array, intensity or model.intensity)
        return model.segment_volume(array, ijk_to_ras, mode=mode, axis=ax, slice_range=sliceRange, prompts=prompts,
                                    progress=progress, cancel=cancel, value_range=vr)

    def segmentVolume(self, volumeNode, segmentationNode, segmentId: Optional[str] = None,
                      adapter: Union[None, str, Adapter] = None, backbone: Optional[str] = None,
                      axis: Union[int, str] = "K", sliceRange: Optional[Tuple[int, int]] = None,
                      points: PointList = (), boxes: Sequence[Sequence[float]] = (), mode: str = "auto",
                      progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                      overwrite: bool = False, editorLogic=None, device: Optional[str] = None,
                      intensity: Optional[IntensityRule] = None, segmentName: Optional[str] = None) -> str:
        """Segment and write into ``segmentationNode``; returns the segment ID.

        Without ``segmentId`` a new segment is added (named after the adapter's target). An existing,
        non-empty segment is only replaced with ``overwrite=True``; with ``sliceRange`` only those
        slices of it change. With ``editorLogic`` (a ``vtkSlicerSegmentEditorLogic``) the write goes
        through the Segment Editor: its masking settings apply and one ``Undo()`` reverts it.
        """
        if segmentationNode is None:
            raise InputError("no segmentation node given")
        model = self.loadModel(backbone, adapter, device)
        if segmentId and segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise InputError(f"segment {segmentId!r} is not in {segmentationNode.GetName()}")
        if segmentId and not overwrite and not mrml.segment_is_empty(segmentationNode, segmentId):
            raise InputError(f"segment {segmentId!r} already has content; pass overwrite=True to replace it "
                             "or leave segmentId empty to add a new segment")
        mask = self.predictVolume(volumeNode, axis, sliceRange, points, boxes, mode, progress, cancel, model,
                                  intensity, segmentationNode)
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode, segmentationNode)
        extent = None
        if sliceRange is not None:
            ax = resolve_axis(axis, ijk_to_ras)
            extent = mrml.slice_extent(mask.shape, ax, *sliceRange)
            if segmentId and editorLogic is None:  # keep the segment outside the range
                kept = mrml.segment_mask(segmentationNode, segmentId, volumeNode)
                outside = np.ones(mask.shape, bool)
                outside[(slice(None),) * ax + (slice(sliceRange[0], sliceRange[1] + 1),)] = False
                mask = np.where(outside, kept, mask)
                extent = None
        labelmap = mrml.labelmap_from_mask(mask, ijk_to_ras, extent)  # allocated before the scene changes
        del mask
        if editorLogic is not None:
            editorLogic.SaveStateForUndo()  # one undo step covers the new segment and its voxels
        if not segmentation_has_geometry(segmentationNode):
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        added = None
        segmentation = segmentationNode.GetSegmentation()
        if not segmentId:
            name = segmentName or model.target_name
            segmentId = added = segmentation.AddEmptySegment(segmentation.GenerateUniqueSegmentID(name), name,
                                                             list(model.target_color))
        before = mrml.segment_labelmap(segmentationNode, segmentId) if editorLogic is None and not added else None
        try:
            self.writeLabelmap(labelmap, segmentationNode, segmentId, extent, editorLogic)
        except BaseException:  # leave the scene as it was: no half-made segment, no half-replaced one
            if editorLogic is not None:
                editorLogic.Undo()  # the state saved above, partial writes included
            elif added:
                segmentation.RemoveSegment(added)
            else:
                mrml.restore_segment(segmentationNode, segmentId, before)
            raise
        return segmentId

    # ------------------------------------------------------------------ writing
    @staticmethod
    def writeMask(mask: np.ndarray, ijk_to_ras: np.ndarray, segmentationNode, segmentId: str,
                  extent: Optional[Sequence[int]] = None, editorLogic=None, saveUndo: bool = True) -> None:
        """KJI mask at ``ijk_to_ras`` -> the segment. Without an editor logic the segment is replaced
        (``extent`` only crops the labelmap); through the editor, ``extent`` limits the change to those
        voxels (e.g. a slice range) and the editor's masking settings apply."""
        labelmap = mrml.labelmap_from_mask(mask, ijk_to_ras, extent)
        if editorLogic is not None and saveUndo:
            editorLogic.SaveStateForUndo()
        PromiseSegmentLogic.writeLabelmap(labelmap, segmentationNode, segmentId, extent, editorLogic)

    @staticmethod
    def writeLabelmap(labelmap, segmentationNode, segmentId: str, extent: Optional[Sequence[int]] = None,
                      editorLogic=None) -> None:
        """A ``vtkOrientedImageData`` -> the segment (see ``writeMask``); saves no undo state."""
        import slicer

        if editorLogic is not None:
            mode = slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet
            if extent is None:
                editorLogic.ModifySegmentByLabelmap(segmentationNode, segmentId, labelmap, mode, False, False)
            else:
                editorLogic.ModifySegmentByLabelmap(segmentationNode, segmentId, labelmap, mode, list(extent), False,
                                                    False)
            return
        replace = slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                labelmap, segmentationNode, segmentId, replace, list(labelmap.GetExtent())):
            raise RuntimeError(f"Slicer refused to write segment {segmentId!r}")

    @staticmethod
    def slicesLabelmap(volumeNode, axis: Union[int, str], masks: Dict[int, np.ndarray], segmentationNode=None):
        """Slice results {index: mask} -> (``vtkOrientedImageData`` spanning those slices, its IJK extent):
        what the effect hands to ``modifySelectedSegmentByLabelmap`` (slices in between are cleared)."""
        from PromiseSegmentLib.preprocessing import put_slice

        if not masks:
            raise InputError("no slice result to write")
        shape = mrml.volume_array(volumeNode).shape[:3]
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode, segmentationNode)
        ax = resolve_axis(axis, ijk_to_ras)
        full = np.zeros(shape, np.uint8)  # only the block inside the extent is copied into the labelmap
        for index, mask in masks.items():
            put_slice(full, ax, index, mask.astype(np.uint8))
        extent = mrml.slice_extent(shape, ax, min(masks), max(masks))
        return mrml.labelmap_from_mask(full, ijk_to_ras, extent), extent

    def sliceLabelmap(self, volumeNode, axis: Union[int, str], sliceIndex: int, sliceMask: np.ndarray,
                      segmentationNode=None):
        return self.slicesLabelmap(volumeNode, axis, {sliceIndex: sliceMask}, segmentationNode)

    # ------------------------------------------------------------------ propagation
    def propagate(self, volumeNode, axis: Union[int, str], startIndex: int, startMask: np.ndarray,
                  direction: int = 0, maxSlices: Optional[int] = None, minAreaFraction: float = 0.1,
                  negativeMask: Optional[np.ndarray] = None, model: Optional[ProMISeModel] = None,
                  progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                  **modelArgs) -> Dict[int, np.ndarray]:
        """From an accepted slice, segment neighbours one after another: each uses the previous slice's
        bounding box as the box prompt (SAM ViT: with the mask as mask prompt; box-only backbones such as
        LiteMedSAM follow their reference: box + 3 px, no mask prompt) with the adapter's IPS, and stops
        where the object vanishes (area below ``minAreaFraction`` of the previous slice). ``direction``
        +1/-1, or 0 for both ways. ``negativeMask`` (KJI, e.g. the other visible segments) adds negative
        points on backbones that take points. Returns {slice index: mask}; nothing is written."""
        from PromiseSegmentLib.engine import Cancelled

        model = self._model(model, **modelArgs)
        array = mrml.volume_array(volumeNode)
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode)
        ax = resolve_axis(axis, ijk_to_ras)
        n = array.shape[ax]
        slice_indices(n, (startIndex, startIndex))
        if not startMask.any():
            raise InputError("the accepted slice is empty; nothing to propagate")
        mode = "auto"  # with a box: IPS when there is an adapter, else the plain backbone (promise.resolve_mode)
        box_only = model.backbone.spec.box_only
        margin = 3 if box_only else 1
        vr = self.valueRange(volumeNode, array, model.intensity)
        steps = [d for d in ((1, -1) if direction == 0 else (int(np.sign(direction)),))]
        limit = maxSlices or n
        total = sum(min(limit, (n - 1 - startIndex) if d > 0 else startIndex) for d in steps)
        results: Dict[int, np.ndarray] = {}
        done = 0
        rng = np.random.default_rng(0)
        for d in steps:
            previous, index = startMask.astype(bool), startIndex + d
            while 0 <= index < n and abs(index - startIndex) <= limit:
                if cancel is not None and cancel():
                    raise Cancelled()
                pts, labels = None, None
                if negativeMask is not None and not box_only:
                    neg = np.argwhere(take_slice(negativeMask, ax, index) > 0)
                    if len(neg):
                        pick = neg[rng.choice(len(neg), min(3, len(neg)), replace=False)]
                        pts, labels = pick[:, ::-1].astype(float), np.zeros(len(pick), int)
                prompts = Prompts(pts, labels, mask_bbox(previous, margin))
                mask = model.segment_slice(array, ijk_to_ras, ax, index, prompts, None if box_only else previous, mode,
                                           vr).masks[0]
                done += 1
                if progress:
                    progress(done, total)
                if mask.sum() < minAreaFraction * previous.sum() or not mask.any():
                    break
                results[index] = mask.astype(bool)
                previous, index = results[index], index + d
        return results

    # ------------------------------------------------------------------ training
    def trainingCases(self, pairs: Sequence[Tuple[object, object, str]], intensity: IntensityRule,
                      axis: Union[int, str] = "K", emptyShare: float = 0.1, seed: int = 0):
        """(volume node, segmentation node, segment ID) triples -> training slices: each segment is
        exported on its volume's grid (Slicer's own export), then sliced like files would be."""
        from PromiseSegmentLib.datasets import volume_cases

        cases = []
        for volumeNode, segmentationNode, segmentId in pairs:
            array = mrml.volume_array(volumeNode)
            mask = mrml.segment_mask(segmentationNode, segmentId, volumeNode)
            name = f"{volumeNode.GetName()}_{segmentId}"
            cases += volume_cases(name, array, mask, mrml.volume_ijk_to_ras(volumeNode), intensity, axis, None,
                                  emptyShare, seed)
        return cases

    def trainAdapter(self, pairs: Sequence[Tuple[object, object, str]], output: Union[str, os.PathLike],
                     backbone: Optional[str] = None, config=None, axis: Union[int, str] = "K",
                     valFraction: float = 0.15, emptyShare: float = 0.1, resume: bool = False,
                     progress: Optional[Callable[[int, int, dict], None]] = None,
                     cancel: Optional[CancelFn] = None, device: Optional[str] = None):
        """Train an APM+IPS adapter from segmentations already in the scene; the backbone stays frozen.
        ``config`` is a ``TrainConfig``; returns its ``TrainResult`` and writes ``output``."""
        from PromiseSegmentLib.training import TrainConfig, train_adapter

        config = config or TrainConfig()
        cases = self.trainingCases(pairs, IntensityRule.from_dict(config.intensity), axis, emptyShare, config.seed)
        order = np.random.default_rng(config.seed).permutation(len(cases))
        n_val = max(1, int(round(valFraction * len(cases)))) if len(cases) > 1 else 0
        val, train = [cases[i] for i in order[:n_val]], [cases[i] for i in order[n_val:]]
        config.check()
        engine = engine_for(self.loadBackbone(backbone, None, device), None, device)
        return train_adapter(engine, train, val, config, Path(output), resume, progress, cancel)


def load_family(name: str) -> str:
    from PromiseSegmentLib.backbone import BACKBONES

    return BACKBONES[name].family if name in BACKBONES else ""


def training_pairs_in_scene(scene, segmentName: str, fallbackVolumes: Optional[Dict[str, object]] = None):
    """Every segmentation in the scene with a segment called ``segmentName`` (case-insensitive), paired with
    the volume it was drawn on (its reference-geometry volume, else ``fallbackVolumes[segmentation ID]``).

    Returns ((volume, segmentation, segment ID) triples, names of segmentations skipped and why): a cohort
    loaded into one scene trains one adapter; empty segments and segmentations with no volume are skipped."""
    pairs, skipped = [], []
    wanted = segmentName.strip().lower()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        if node.GetHideFromEditors():  # e.g. the effect's preview
            continue
        segmentation = node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        match = [sid for sid in ids if segmentation.GetSegment(sid).GetName().strip().lower() == wanted]
        if not match:
            continue
        volume = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        volume = volume or (fallbackVolumes or {}).get(node.GetID())
        if volume is None:
            skipped.append(f"{node.GetName()} (no volume: set its source volume in the Segment Editor)")
        elif mrml.segment_is_empty(node, match[0]):
            skipped.append(f"{node.GetName()} (segment {segmentName!r} is empty)")
        else:
            pairs.append((volume, node, match[0]))
    return pairs, skipped


def segmentation_has_geometry(segmentationNode) -> bool:
    return bool(segmentationNode.GetSegmentation().GetConversionParameter("Reference image geometry"))


def visible_other_segments_mask(segmentationNode, volumeNode, exclude: str) -> Optional[np.ndarray]:
    """Union of the other visible segments on the volume grid (negative prompts), or None."""
    import vtk

    display = segmentationNode.GetDisplayNode()
    ids = vtk.vtkStringArray()
    if display is not None:
        display.GetVisibleSegmentIDs(ids)
    else:
        segmentationNode.GetSegmentation().GetSegmentIDs(ids)
    others: List[str] = [ids.GetValue(i) for i in range(ids.GetNumberOfValues()) if ids.GetValue(i) != exclude]
    if not others:
        return None
    out = None
    for sid in others:
        m = mrml.segment_mask(segmentationNode, sid, volumeNode)
        out = m if out is None else np.maximum(out, m)
    return out
