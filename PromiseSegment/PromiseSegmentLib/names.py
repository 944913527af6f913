"""Names shared by the command line and Slicer's lists, importable before torch is installed.

``Testing/test_checkpoints.py`` checks these against the registries they mirror (``registry.BACKBONES``,
``promise.MODES``), so a new backbone or mode cannot be forgotten here.
"""

DEFAULT_BACKBONE = "lite_medsam"
USER_BACKBONES = ("lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam")  # the default first
BOX_ONLY_BACKBONES = ("lite_medsam",)  # trained on box prompts: points alone segment nothing
MODES = ("auto", "apm+ips", "ips", "apm+clicks", "vanilla")
DEFAULT_COLOR = (0.9, 0.3, 0.2)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # acceleration.resolve_precision says what each means here
DEVICES = ("auto", "cuda", "mps", "cpu")  # "auto": CUDA, then Apple MPS, then CPU
AXES = ("axial", "coronal", "sagittal", "K", "J", "I")  # anatomical planes or the volume's own IJK axes
