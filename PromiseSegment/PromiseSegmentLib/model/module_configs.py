"""The APM's and IPS's constructor arguments as frozen records, torch-free: what an adapter file's
metadata stores and what ``APM``/``IPS`` are built from. Values are kept as given (lists become tuples);
the modules' own checks refuse bad ones before any layer is allocated."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Dict, Tuple, Type, TypeVar

Config = TypeVar("Config", "ApmConfig", "IpsConfig")


@dataclass(frozen=True)
class ApmConfig:
    tap_channels: Tuple[int, ...]
    image_size: int
    prompts: Tuple[str, ...]
    slot_labels: Tuple[int, ...]
    fusion_dim: int
    head_blocks: Tuple[int, ...]
    tap_pool: int
    box_refinement: int = 0  # re-decodes with the previous mask's box (chosen after training)
    refinement_margin: float = 0.0

    @property
    def box_only(self) -> bool:
        return tuple(self.prompts) == ("box",)


@dataclass(frozen=True)
class IpsConfig:
    dim: int
    hidden: int
    n_tokens: int


def config_from_json(kind: Type[Config], table: Any) -> Config:
    """A config from its metadata table; a missing or unknown key is a ``ValueError`` naming it."""
    name = kind.__name__[:3].upper()
    if not isinstance(table, dict):
        raise ValueError(f"{name} must be a table")
    names = {f.name for f in fields(kind)}
    required = {f.name for f in fields(kind) if f.default is MISSING}
    unknown, missing = sorted(set(table) - names), sorted(required - set(table))
    if unknown:
        raise ValueError(f"{name} configuration has unknown keys {', '.join(unknown)}")
    if missing:
        raise ValueError(f"{name} configuration lacks {', '.join(missing)}")
    values: Dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return kind(**values)


def config_to_json(config) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
