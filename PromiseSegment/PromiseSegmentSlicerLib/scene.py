"""Finding things in a Slicer scene for the logic: the segmentations a cohort adapter trains on, and the
other visible segments (negative prompts). No Qt."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from . import mrml


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
