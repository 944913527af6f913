"""Names shared by the command line and Slicer's lists, importable before torch is installed.

``Testing/backbones/test_checkpoints.py`` checks these against the registries they mirror (``registry.BACKBONES``,
``modes.MODES``), so a new backbone or mode cannot be forgotten here.
"""

DEFAULT_BACKBONE = "lite_medsam"
USER_BACKBONES = ("lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam")  # the default first
# name -> (family, tap channels): what decides whether an adapter fits a backbone (same name, or same family
# and taps: MedSAM is a fine-tuned ViT-B), known before torch or any download
BACKBONE_KINDS = {
    "lite_medsam": ("lite_medsam", (160, 160, 320)),
    "sam_vit_b": ("sam_vit", (768, 768, 768)),
    "sam_vit_l": ("sam_vit", (1024, 1024, 1024)),
    "sam_vit_h": ("sam_vit", (1280, 1280, 1280)),
    "medsam": ("sam_vit", (768, 768, 768)),
    "tiny_random": ("sam_vit", (64, 64, 64)),
}
BOX_ONLY_BACKBONES = ("lite_medsam",)  # trained on box prompts: points alone segment nothing
MODES = ("auto", "apm+ips", "ips", "apm+clicks", "vanilla")
DEFAULT_COLOR = (0.9, 0.3, 0.2)
DEFAULT_NAME = "Segment"  # the target name when neither an adapter nor the user gave one
RESNET34_BLOCKS = (3, 4, 6, 3)  # the APM head's residual blocks per stage, as ResNet-34
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # acceleration.resolve_precision says what each means here
RUNTIMES = ("auto", "torch", "openvino")  # the image encoder's runtime (openvino_runtime.resolve_runtime)
RUNTIME_ENV = "PROMISE_SEGMENT_RUNTIME"  # the runtime when none is given (tests pin "torch")
DEVICES = ("auto", "cuda", "mps", "cpu")  # "auto": CUDA, then Apple MPS, then CPU
AXES = ("axial", "coronal", "sagittal", "K", "J", "I")  # anatomical planes or the volume's own IJK axes
