"""A real Slicer MRML application on the ``slicer-core`` wheel (no GUI), built as Slicer builds it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SlicerApp:
    scene: object
    app_logic: object
    segmentations: object

    def editor(self, segmentation_node, volume_node, segment_id: str):
        """``vtkSlicerSegmentEditorLogic``: the Qt-free engine behind ``modifySelectedSegmentByLabelmap``."""
        from slicer import vtkSlicerSegmentEditorLogic

        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor = vtkSlicerSegmentEditorLogic()
        editor.SetMRMLScene(self.scene)
        editor.SetMRMLApplicationLogic(self.app_logic)
        editor.SetSegmentEditorNode(node)
        editor.SetSegmentationNode(segmentation_node)
        editor.SetSourceVolumeNode(volume_node)
        node.SetSelectedSegmentID(segment_id)
        return editor, node


def make_app() -> SlicerApp:
    import slicer
    from slicer import vtkMRMLScene, vtkSlicerApplicationLogic, vtkSlicerSegmentationsModuleLogic

    scene = vtkMRMLScene()
    slicer.mrmlScene = scene
    app = vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    seg_logic = vtkSlicerSegmentationsModuleLogic()  # creating it registers the labelmap converters
    seg_logic.SetMRMLScene(scene)
    seg_logic.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Segmentations", seg_logic)
    return SlicerApp(scene, app, seg_logic)


def oblique_matrix(spacing=(0.7, 0.7, 3.0), degrees=(25.0, -15.0), origin=(-40.0, 12.5, 80.0)) -> np.ndarray:
    """IJK->RAS with a non-identity direction (two rotations), anisotropic spacing, an offset origin."""
    a, b = np.deg2rad(degrees)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def add_volume(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "volume", vector: bool = False):
    from PromiseSegmentSlicerLib.mrml import volume_node_from_array

    node = volume_node_from_array(scene, array, ijk_to_ras, name)
    assert node.IsA("vtkMRMLVectorVolumeNode") == vector
    return node


def add_segmentation(scene, volume_node, name: str = "segmentation"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def ellipsoid(shape, center, radii) -> np.ndarray:
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d = ((k - center[0]) / radii[0]) ** 2 + ((j - center[1]) / radii[1]) ** 2 + ((i - center[2]) / radii[2]) ** 2
    return (d <= 1).astype(np.uint8)


def load_nrrd(scene, path, labelmap: bool = False):
    """What ``slicer.util.loadVolume`` does inside Slicer, with the NRRD storage node of slicer-core."""
    import slicer

    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, str(path).rsplit("/", 1)[-1].split(".")[0])
    storage = slicer.vtkMRMLNRRDStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise OSError(f"could not read {path}")
    return node


def save_segmentation(seg_node, path) -> None:
    """What ``slicer.util.saveNode`` does for a segmentation: a .seg.nrrd through the storage node."""
    import slicer

    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(seg_node):
        raise OSError(f"could not write {path}")


def write_mask(mask: np.ndarray, ijk_to_ras: np.ndarray, segmentation_node, segment_id: str) -> None:
    """Replace a segment with a KJI mask at ``ijk_to_ras`` (ground truth for a test), through the logic's
    one writer."""
    from PromiseSegmentSlicerLib.logic import SceneLogic
    from PromiseSegmentSlicerLib.mrml import labelmap_from_mask

    SceneLogic.writeLabelmap(labelmap_from_mask(mask, ijk_to_ras), segmentation_node, segment_id)
