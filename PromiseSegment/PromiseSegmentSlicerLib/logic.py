"""``SceneLogic``: ProMISe on Slicer's MRML nodes, with no Qt (console, batch scripts, the
module widget and the Segment Editor effect all call this; pytest runs it on ``slicer-core``).

Results are computed completely before the scene is touched and then written in one call, so a
cancelled or failed run leaves every segment as it was.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from PromiseSegmentLib.backbones.base import LoadedBackbone
from PromiseSegmentLib.backbones.registry import load_backbone
from PromiseSegmentLib.callbacks import CancelFn, ProgressFn
from PromiseSegmentLib.data.preprocessing import IntensityRule, resolve_axis
from PromiseSegmentLib.data.prompts import check_ijk_prompts, ijk_prompts  # the same rules as the command line
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache
from PromiseSegmentLib.inference.propagation import PropagationLimits, check_start_mask, propagate
from PromiseSegmentLib.inference.volume_loop import slice_indices, volume_value_range
from PromiseSegmentLib.model.adapter import Adapter, load_adapter, read_metadata
from PromiseSegmentLib.model.promise import ProMISeModel, engine_for
from PromiseSegmentLib.names import MODES

from . import mrml
from .editor_write import write_block

log = logging.getLogger(__name__)

PointList = Sequence[Sequence[float]]  # IJK voxels (i, j, k[, label]); boxes are (i0, j0, k0, i1, j1, k1)


def exclusive(method):
    """Refuse a call made while another run of this logic is waiting in one of its progress / cancel
    callbacks. Those callbacks process GUI events, so without this a click or a second Apply during a
    run would start a nested run on the same model and scene."""

    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self._yielding:
            raise InputError(f"ProMISe is still running ({self._running}); wait for it to finish or cancel it")
        bound = signature.bind(self, *args, **kwargs)
        for name in ("progress", "cancel"):
            if bound.arguments.get(name) is not None:
                bound.arguments[name] = self._yieldingCallback(bound.arguments[name])
        outer = self._running is None
        if outer:
            self._running = method.__name__
        try:
            return method(*bound.args, **bound.kwargs)
        finally:
            if outer:
                self._running = None

    return call


class SceneLogic:
    """Console API. One SAM is kept in memory and reused across calls (re-loaded only when another
    checkpoint or device is asked for); encoder outputs are cached by slice content, so a repeated run,
    or a click on an already-encoded slice, re-runs the decoder only."""

    def __init__(
        self,
        embeddingCacheBytes: int = 1 << 30,
        backbone: Optional[str] = None,
        precision: str = "auto",
        runtime: Optional[str] = None,
    ):
        """``backbone``: used when a call names none and its adapter does not say (default LiteMedSAM).
        ``precision``: the engine's (``acceleration``; "auto" = the fastest mode measured to agree with fp32).
        ``runtime``: the encoder's (``openvino_runtime``; None: ``$PROMISE_SEGMENT_RUNTIME``, else auto)."""
        self.defaultBackbone = backbone
        self.precision, self.runtime = precision, runtime
        self.engineDescription = ""  # what runs, e.g. "lite_medsam on cpu (2 threads): bf16 (...)"
        self.embeddingCache = EmbeddingCache(embeddingCacheBytes)
        self._backbone: Optional[LoadedBackbone] = None
        self._backboneKey: Optional[tuple] = None
        self._adapters: Dict[tuple, Adapter] = {}
        self._value_ranges: Dict[tuple, Tuple[float, float]] = {}
        self._running: Optional[str] = None  # the outermost public call in progress
        self._yielding = 0  # > 0 while a caller's progress/cancel callback runs (GUI events are processed)

    def _yieldingCallback(self, callback):
        if getattr(callback, "_promiseYielding", False):
            return callback

        def call(*args):
            self._yielding += 1
            try:
                return callback(*args)
            finally:
                self._yielding -= 1

        call._promiseYielding = True
        return call

    # ------------------------------------------------------------------ models
    @exclusive
    def loadBackbone(
        self,
        backbone: Optional[str] = None,
        expected: Optional[str] = None,
        device: Optional[str] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> LoadedBackbone:
        """The frozen backbone (registry name, e.g. "lite_medsam" - the default - or "sam_vit_b", or a
        checkpoint path), kept in memory until another one is asked for. ``expected``: the backbone an
        adapter was trained on (used when ``backbone`` is not given). ``progress(bytes, total)`` and
        ``cancel()`` follow a first-time checkpoint download."""
        if not self._holds(backbone, expected, device):
            self._backbone = None  # release the old model before loading a new one
            self.embeddingCache.clear()
            spec = backbone or (None if expected else self.defaultBackbone)
            self._backbone = load_backbone(spec or expected, expected, progress=progress, cancel=cancel)
            self._backboneKey = self._keyFor(backbone, expected, device)
        return self._backbone

    def _keyFor(self, backbone, expected, device) -> tuple:
        backbone = backbone or (None if expected else self.defaultBackbone)
        return str(backbone or expected or "default"), str(device)

    def _holds(self, backbone, expected, device) -> bool:
        return (
            self._backbone is not None
            and self._backboneKey == self._keyFor(backbone, expected, device)
            and not (expected and self._backbone.spec.family != load_family(expected))
        )

    @staticmethod
    def _adapterBackbone(adapter) -> Optional[str]:
        """The backbone an adapter (file or object) was trained on, from its metadata only."""
        if isinstance(adapter, Adapter):
            return adapter.backbone.name
        return read_metadata(adapter).backbone.name if adapter else None

    def _adapterKey(self, path: Path, loaded: LoadedBackbone, allowMismatch: bool) -> tuple:
        return str(path.resolve()), path.stat().st_mtime_ns, loaded.name, loaded.identity, allowMismatch

    @exclusive
    def loadModel(
        self,
        backbone: Optional[str] = None,
        adapter: Union[None, str, Adapter] = None,
        device: Optional[str] = None,
        allowMismatch: bool = False,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> ProMISeModel:
        """Backbone (``None``: the adapter's, else LiteMedSAM; a registry name or a checkpoint path) plus an
        optional adapter (file path or an ``Adapter``). An adapter's metadata is checked before any
        weights are loaded; ``progress``/``cancel`` follow a first-time checkpoint download."""
        loaded = self.loadBackbone(backbone, self._adapterBackbone(adapter), device, progress, cancel)
        adapterObject = adapter if isinstance(adapter, Adapter) else None
        if adapter and adapterObject is None:
            path = Path(adapter)
            key = self._adapterKey(path, loaded, allowMismatch)
            if key not in self._adapters:
                self._adapters = {key: load_adapter(path, loaded, allowMismatch)}
            adapterObject = self._adapters[key]
        engine = engine_for(
            loaded, adapterObject, device, cache=self.embeddingCache, precision=self.precision, runtime=self.runtime
        )
        if engine.describe() != self.engineDescription:
            self.engineDescription = engine.describe()
            log.info("ProMISe engine: %s", self.engineDescription)  # once per change, not per call
        return ProMISeModel(engine, adapterObject)

    def hasModel(
        self,
        backbone: Optional[str] = None,
        adapter: Union[None, str, Adapter] = None,
        device: Optional[str] = None,
        allowMismatch: bool = False,
    ) -> bool:
        """True when ``loadModel`` with these arguments would load nothing (no install, no download, no
        weights read): the effect accepts clicks only then, so a mouse handler never does the set-up."""
        try:
            expected = self._adapterBackbone(adapter)
            if not self._holds(backbone, expected, device):
                return False
            return (
                isinstance(adapter, Adapter)
                or not adapter
                or (self._adapterKey(Path(adapter), self._backbone, allowMismatch) in self._adapters)
            )
        except (OSError, ValueError):
            return False  # an unreadable adapter: loadModel will say why

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
    @exclusive
    def segmentSlice(
        self,
        volumeNode,
        sliceIndex: int,
        axis: Union[int, str] = "K",
        points: PointList = (),
        box: Optional[Sequence[float]] = None,
        previousMask: Optional[np.ndarray] = None,
        mode: str = "auto",
        model: Optional[ProMISeModel] = None,
        intensity: Optional[IntensityRule] = None,
        **modelArgs,
    ) -> np.ndarray:
        """One slice -> bool mask on that slice's grid (rows, cols as ``take_slice`` gives them).

        ``points`` are IJK voxels (i, j, k[, label]) on this slice (label 1 positive, 0 negative);
        ``box`` is (i0, j0, k0, i1, j1, k1); ``previousMask`` a neighbouring slice's result used as a
        mask prompt (propagation). ``intensity`` overrides the adapter's intensity rule."""
        array = mrml.volume_array(volumeNode)
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode)
        ax = resolve_axis(axis, ijk_to_ras)
        per_slice = self._checked(ax, points, [box] if box is not None else [], array.shape, mode, intensity)
        stray = sorted(set(per_slice) - {sliceIndex})
        if stray:
            raise InputError(f"prompts on slice(s) {stray}, not on slice {sliceIndex}")
        slice_indices(array.shape[ax], (sliceIndex, sliceIndex))
        model = self._model(model, **modelArgs)
        vr = self.valueRange(volumeNode, array, intensity or model.intensity)
        pred = model.segment_slice(array, ijk_to_ras, ax, sliceIndex, per_slice.get(sliceIndex), previousMask, mode, vr)
        return pred.masks[0].astype(bool)

    @staticmethod
    def _checked(ax: int, points: PointList, boxes, shape, mode: str, intensity: Optional[IntensityRule]) -> dict:
        """Arguments refused with one sentence before any model work (the command line's rules); returns
        the IJK prompts as per-slice prompts."""
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if intensity is not None:
            intensity.check()
        for note in check_ijk_prompts(points, boxes, shape, ax):
            logging.warning("PromiseSegment: %s", note)
        return ijk_prompts(ax, list(points), list(boxes), shape)

    @exclusive
    def predictVolume(
        self,
        volumeNode,
        *,
        axis: Union[int, str] = "K",
        sliceRange: Optional[Tuple[int, int]] = None,
        points: PointList = (),
        boxes: Sequence[Sequence[float]] = (),
        mode: str = "auto",
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
        model: Optional[ProMISeModel] = None,
        intensity: Optional[IntensityRule] = None,
        segmentationNode=None,
        **modelArgs,
    ) -> np.ndarray:
        """The whole (or ``sliceRange`` of the) volume -> KJI uint8 mask; the scene is not touched.
        Slices are streamed, so memory is the volume plus one mask, not a stack of embeddings."""
        array = mrml.volume_array(volumeNode)
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode, segmentationNode)
        ax = resolve_axis(axis, ijk_to_ras)
        prompts = self._checked(ax, points, boxes, array.shape, mode, intensity)
        if sliceRange is not None:
            slice_indices(array.shape[ax], sliceRange)
        model = self._model(model, **modelArgs)
        vr = self.valueRange(volumeNode, array, intensity or model.intensity)
        return model.segment_volume(
            array,
            ijk_to_ras,
            mode=mode,
            axis=ax,
            slice_range=sliceRange,
            prompts=prompts,
            progress=progress,
            cancel=cancel,
            value_range=vr,
        )

    def segmentScope(
        self,
        volumeNode,
        segmentationNode,
        axis: Union[int, str] = "K",
        sliceRange: Optional[Tuple[int, int]] = None,
        **predictArgs,
    ):
        """What the effect's "slice range" / "whole volume" scopes write: the predicted slices as
        (``vtkOrientedImageData`` in the segmentation's frame, its IJK extent), ready for
        ``writeLabelmap`` or ``modifySelectedSegmentByLabelmap``. ``predictArgs`` go to ``predictVolume``."""
        mask = self.predictVolume(
            volumeNode, axis=axis, sliceRange=sliceRange, segmentationNode=segmentationNode, **predictArgs
        )
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode, segmentationNode)
        ax = resolve_axis(axis, ijk_to_ras)
        extent = mrml.slice_extent(mask.shape, ax, *(sliceRange or (0, mask.shape[ax] - 1)))
        return mrml.labelmap_from_mask(mask, ijk_to_ras, extent), extent

    @exclusive
    def segmentVolume(
        self,
        volumeNode,
        segmentationNode,
        segmentId: Optional[str] = None,
        *,
        adapter: Union[None, str, Adapter] = None,
        backbone: Optional[str] = None,
        axis: Union[int, str] = "K",
        sliceRange: Optional[Tuple[int, int]] = None,
        points: PointList = (),
        boxes: Sequence[Sequence[float]] = (),
        mode: str = "auto",
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
        overwrite: bool = False,
        editorLogic=None,
        device: Optional[str] = None,
        intensity: Optional[IntensityRule] = None,
        segmentName: Optional[str] = None,
    ) -> str:
        """Segment and write into ``segmentationNode``; returns the segment ID.

        Without ``segmentId`` a new segment is added (named after the adapter's target). An existing,
        non-empty segment is only replaced with ``overwrite=True``; with ``sliceRange`` only those
        slices of it change. With ``editorLogic`` (a ``vtkSlicerSegmentEditorLogic``) the write goes
        through the Segment Editor: its masking settings apply and one ``Undo()`` reverts it.
        """
        checkTarget(segmentationNode, segmentId, overwrite)
        model = self.loadModel(backbone, adapter, device)
        mask = self.predictVolume(
            volumeNode,
            axis=axis,
            sliceRange=sliceRange,
            points=points,
            boxes=boxes,
            mode=mode,
            progress=progress,
            cancel=cancel,
            model=model,
            intensity=intensity,
            segmentationNode=segmentationNode,
        )
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode, segmentationNode)
        extent = None
        if sliceRange is not None:
            ax = resolve_axis(axis, ijk_to_ras)
            extent = mrml.slice_extent(mask.shape, ax, *sliceRange)
            if segmentId and editorLogic is None:  # keep the segment outside the range
                mask, extent = keptOutside(mask, segmentationNode, segmentId, volumeNode, ax, sliceRange), None
        labelmap = mrml.labelmap_from_mask(mask, ijk_to_ras, extent)  # allocated before the scene changes
        del mask
        if not segmentation_has_geometry(segmentationNode):
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        name = segmentName or model.target_name
        return self._writeNewOrExisting(
            labelmap, segmentationNode, segmentId, (name, model.target_color), extent, editorLogic
        )

    def _writeNewOrExisting(
        self, labelmap, segmentationNode, segmentId: Optional[str], newSegment, extent, editorLogic
    ) -> str:
        """Write into ``segmentId``, or a new segment (name, colour) when it is empty; any failure puts the
        scene back as it was: no half-made segment, no half-replaced one, nothing to undo."""
        # one undo step covers the new segment and its voxels (False: the editor keeps no history)
        saved = editorLogic is not None and editorLogic.SaveStateForUndo()
        segmentation = segmentationNode.GetSegmentation()
        added = None
        if not segmentId:
            name, color = newSegment
            segmentId = added = segmentation.AddEmptySegment(
                segmentation.GenerateUniqueSegmentID(name), name, list(color)
            )
        before = mrml.segment_labelmap(segmentationNode, segmentId) if not (saved or added) else None
        try:
            self.writeLabelmap(labelmap, segmentationNode, segmentId, extent, editorLogic)
        except BaseException:
            if saved:
                editorLogic.Undo()  # the state saved above, partial writes included
            elif added:
                segmentation.RemoveSegment(added)
            else:
                mrml.restore_segment(segmentationNode, segmentId, before)
            raise
        return segmentId

    # ------------------------------------------------------------------ writing
    @staticmethod
    def writeLabelmap(
        labelmap, segmentationNode, segmentId: str, extent: Optional[Sequence[int]] = None, editorLogic=None
    ) -> None:
        """The one way results reach a segment (saves no undo state).

        Without an editor logic the segment is replaced by ``labelmap`` (``extent`` only crops it).
        Through a ``vtkSlicerSegmentEditorLogic`` only the voxels inside ``extent`` change, with the editor's
        masking and overwrite settings applied there (``editor_write.write_block``, which the effect's Apply
        uses too); no other segment changes outside ``extent``."""
        import slicer

        if editorLogic is not None:
            if not editorLogic.ResetModifierLabelmapToDefault():
                raise InputError("the segmentation has no geometry yet; select a source volume in the Segment Editor")

            def modify(modifier, mode, modifierExtent, bypassMasking):
                if modifierExtent is None:
                    editorLogic.ModifySegmentByLabelmap(
                        segmentationNode, segmentId, modifier, mode, False, bypassMasking
                    )
                else:
                    editorLogic.ModifySegmentByLabelmap(
                        segmentationNode, segmentId, modifier, mode, modifierExtent, False, bypassMasking
                    )

            write_block(
                modify,
                segmentationNode,
                segmentId,
                labelmap,
                extent or labelmap.GetExtent(),
                editorLogic.GetModifierLabelmap(),
            )
            return
        replace = slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentationNode, segmentId, replace, list(labelmap.GetExtent())
        ):
            raise RuntimeError(f"Slicer refused to write segment {segmentId!r}")

    @staticmethod
    def slicesLabelmap(volumeNode, axis: Union[int, str], masks: Dict[int, np.ndarray], segmentationNode=None):
        """Slice results {index: mask} -> (``vtkOrientedImageData`` spanning those slices in the
        segmentation's frame, its IJK extent): what a preview, Apply or Propagate writes (slices in
        between are cleared)."""
        from PromiseSegmentLib.data.preprocessing import put_slice

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

    # ------------------------------------------------------------------ propagation
    @exclusive
    def propagate(
        self,
        volumeNode,
        axis: Union[int, str],
        startIndex: int,
        startMask: np.ndarray,
        direction: int = 0,
        maxSlices: Optional[int] = None,
        minAreaFraction: float = 0.1,
        negativeMask: Optional[np.ndarray] = None,
        model: Optional[ProMISeModel] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
        intensity: Optional[IntensityRule] = None,
        minIntensityAgreement: float = 0.5,
        **modelArgs,
    ) -> Dict[int, np.ndarray]:
        """From an accepted slice, segment neighbours one after another: each uses the previous slice's
        bounding box as the box prompt (SAM ViT: with the mask as mask prompt; box-only backbones such as
        LiteMedSAM follow their reference: box + 3 px, no mask prompt) with the adapter's IPS, and stops
        where the object vanishes: area below ``minAreaFraction`` of the previous slice, or fewer than
        ``minIntensityAgreement`` of its pixels inside the accepted object's intensity band (2nd-98th
        percentile) - a box-prompted model always finds *something* in its box, so past the object's end it
        returns background, which this catches. ``direction``
        +1/-1, or 0 for both ways. ``negativeMask`` (KJI, e.g. the other visible segments) adds negative
        points on backbones that take points. ``intensity`` overrides the adapter's rule, as it does for
        the accepted slice's preview. Returns {slice index: mask}; nothing is written."""
        array = mrml.volume_array(volumeNode)
        ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode)
        ax = resolve_axis(axis, ijk_to_ras)
        slice_indices(array.shape[ax], (startIndex, startIndex))
        check_start_mask(startMask)
        model = self._model(model, **modelArgs)
        vr = self.valueRange(volumeNode, array, intensity or model.intensity)
        limits = PropagationLimits(direction, maxSlices, minAreaFraction, minIntensityAgreement)
        return propagate(
            model, array, ijk_to_ras, ax, startIndex, startMask, vr, limits, negativeMask, progress, cancel
        )

    # ------------------------------------------------------------------ cohorts
    @exclusive
    def segmentCohort(
        self,
        paths: Sequence[Union[str, os.PathLike]],
        outputFolder: Union[str, os.PathLike],
        adapter: str,
        *,
        backbone: Optional[str] = None,
        device: Optional[str] = None,
        axis: Union[int, str] = "K",
        intensity: Optional[IntensityRule] = None,
        overwrite: bool = False,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ):
        """Segment volume files, folders of them, DICOM studies or glob patterns into ``outputFolder``, the
        command line's cohort run (``<name>.seg.nrrd`` per case, ``results.csv``; finished cases are skipped
        when run again, a failing case never stops the others) with this logic's model: the backbone is
        loaded once and stays for later calls. ``progress(cases done, cases)``; ``cancel()`` is checked
        between and inside cases (``Cancelled``; the finished cases are kept). Files only: the scene is not
        touched. Returns a ``cohort.run.CohortResult`` (its ``table.rows`` say what happened to each case)."""
        from PromiseSegmentLib.cohort.cases import find_cases
        from PromiseSegmentLib.cohort.run import CohortEvents, segment_cohort
        from PromiseSegmentLib.cohort.segmenter import CaseSegmenter, CohortSettings

        out = Path(outputFolder)
        cases = find_cases([str(p) for p in paths], out)
        settings = CohortSettings(
            adapter=str(adapter),
            backbone=backbone,
            device=device,
            precision=self.precision,
            runtime=self.runtime,
            axis=axis,
            intensity=intensity,
            overwrite=overwrite,
        )
        segmenter = CaseSegmenter(settings)
        segmenter.models[str(adapter)] = self.loadModel(backbone, str(adapter), device)

        class Progress(CohortEvents):
            def finished(self, row, done: int, total: int) -> None:
                if progress is not None:
                    progress(done, total)

        return segment_cohort(cases, out, settings, events=Progress(), cancel=cancel, segmenter=segmenter)

    # ------------------------------------------------------------------ training
    def trainingCases(
        self,
        pairs: Sequence[Tuple[object, object, str]],
        intensity: IntensityRule,
        axis: Union[int, str] = "K",
        emptyShare: float = 0.1,
        seed: int = 0,
        dense: bool = False,
    ):
        """(volume node, segmentation node, segment ID) triples -> training slices: each segment is
        exported on its volume's grid (Slicer's own export), then sliced like files would be. Slices without
        the segment are unknown (not used) unless ``dense`` says every slice was annotated."""
        from PromiseSegmentLib.data.datasets import volume_cases

        cases = []
        for volumeNode, segmentationNode, segmentId in pairs:
            array = mrml.volume_array(volumeNode)
            mask = mrml.segment_mask(segmentationNode, segmentId, volumeNode)
            name = f"{volumeNode.GetName()}_{segmentId}"
            ijk_to_ras = mrml.volume_ijk_to_ras(volumeNode)
            cases += volume_cases(name, array, mask, ijk_to_ras, intensity, axis, None, emptyShare, seed, dense)
        return cases

    @exclusive
    def trainAdapter(
        self,
        pairs: Sequence[Tuple[object, object, str]],
        output: Union[str, os.PathLike],
        backbone: Optional[str] = None,
        options=None,
        config=None,
        resume: bool = False,
        progress: Optional[Callable] = None,
        cancel: Optional[CancelFn] = None,
        device: Optional[str] = None,
    ):
        """Train an APM+IPS adapter from segmentations already in the scene; the backbone stays frozen.

        ``options`` (``training.recipe.RunOptions``; default: the ``auto`` recipe for the data) sets the
        recipe, the user's own settings on top of it, a time budget and the selection share; ``config`` (a
        full ``TrainConfig``) replaces the recipe. ``progress`` gets ``training.records.TrainStatus``
        updates (phase, done, total). Returns the ``TrainResult`` and writes ``output`` (a new file: an
        existing one is refused before any work unless ``resume`` continues its interrupted run)."""
        from PromiseSegmentLib.training.recipe import RunOptions, split_for_selection
        from PromiseSegmentLib.training.run import run_training

        started = time.monotonic()  # the time budget counts from here, reading the scene included
        options = options or RunOptions()
        if config is not None:
            config.check()
        output = Path(output)
        if output.exists() and not resume:
            raise InputError(f"{output} already exists; choose another file name (an adapter is never replaced)")
        if not pairs:
            raise InputError("no (volume, segmentation, segment) to train on")
        intensity = IntensityRule.from_dict(config.intensity if config else options.overrides.get("intensity") or {})
        seed = config.seed if config else options.overrides.get("seed", 0)
        cases = self.trainingCases(pairs, intensity, options.axis, options.empty_share, seed, options.dense)
        train, select = split_for_selection(cases, options.selection_fraction, seed)
        engine = engine_for(self.loadBackbone(backbone, None, device), None, device, precision=self.precision)
        return run_training(engine, train, select, options, output, resume, progress, cancel, log.info, config, started)


def keptOutside(mask: np.ndarray, segmentationNode, segmentId: str, volumeNode, ax: int, sliceRange) -> np.ndarray:
    """``mask`` inside ``sliceRange`` along ``ax``, the segment's current voxels outside it."""
    kept = mrml.segment_mask(segmentationNode, segmentId, volumeNode)
    outside = np.ones(mask.shape, bool)
    outside[(slice(None),) * ax + (slice(sliceRange[0], sliceRange[1] + 1),)] = False
    return np.where(outside, kept, mask)


def checkTarget(segmentationNode, segmentId: Optional[str], overwrite: bool) -> None:
    """Refuse a write target before any model work: no node, an unknown segment, or (without
    ``overwrite``) a segment that already has content."""
    if segmentationNode is None:
        raise InputError("no segmentation node given")
    if segmentId and segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        raise InputError(f"segment {segmentId!r} is not in {segmentationNode.GetName()}")
    if segmentId and not overwrite and not mrml.segment_is_empty(segmentationNode, segmentId):
        raise InputError(
            f"segment {segmentId!r} already has content; pass overwrite=True to replace it "
            "or leave segmentId empty to add a new segment"
        )


def load_family(name: str) -> str:
    from PromiseSegmentLib.backbones.registry import BACKBONES

    return BACKBONES[name].family if name in BACKBONES else ""


def segmentation_has_geometry(segmentationNode) -> bool:
    return bool(segmentationNode.GetSegmentation().GetConversionParameter("Reference image geometry"))
