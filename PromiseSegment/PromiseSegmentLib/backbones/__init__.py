"""Frozen backbones: the base class, the registry, LiteMedSAM, SAM ViT, checkpoint files."""
