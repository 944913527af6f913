"""argparse types of the command line: each checks one value at parse time and refuses it with one
sentence (part of the validation layer, ``validation``). Torch-free."""

from __future__ import annotations

import argparse
import math
import re
from typing import List, Optional, Sequence

from PromiseSegmentLib.names import AXES, DEVICES


def _bad(message: str):
    return argparse.ArgumentTypeError(message)


def _numbers(text: str, counts: Sequence[int], form: str) -> List[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise _bad(f"expected {form}, got {text!r}") from None
    if len(values) not in counts:
        raise _bad(f"expected {form} ({' or '.join(map(str, counts))} numbers), got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise _bad(f"expected finite numbers ({form}), got {text!r}")
    return values


def int_at_least(low: int, high: Optional[int] = None):
    """Whole numbers from ``low`` (to ``high``): an absurd value is refused here, not after the model load."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _bad(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise _bad(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise _bad(f"must be at most {high}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def any_int(text: str) -> int:
    return int_at_least(-(1 << 62))(text)


thread_count = int_at_least(1, 4096)
seed_arg = int_at_least(0, 2**32 - 1)  # numpy's and torch's seeds


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise _bad(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise _bad(f"must be positive, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise _bad(f"must not be negative, got {value:g}")
    return value


def open_fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value < 1:
        raise _bad(f"must be between 0 and 1 (exclusive), got {value:g}")
    return value


def point_arg(text: str) -> List[float]:
    values = _numbers(text, (3, 4), "I,J,K[,LABEL]")
    if len(values) == 4 and values[3] not in (0.0, 1.0):
        raise _bad(f"the label (4th number) must be 1 (positive) or 0 (negative), got {values[3]:g}")
    return values


def box_arg(text: str) -> List[float]:
    return _numbers(text, (6,), "I0,J0,K0,I1,J1,K1")


def window_arg(text: str) -> List[float]:
    center, width = _numbers(text, (2,), "CENTER,WIDTH")
    if width <= 0:
        raise _bad(f"the window width must be positive, got {width:g}")
    lo, hi = center - width / 2, center + width / 2
    if not (hi > lo and math.isfinite(255.0 / (hi - lo))):
        raise _bad(f"the window {text} is too narrow to map intensities at this center (width {width:g})")
    return [center, width]


def percentiles_arg(text: str) -> List[float]:
    low, high = _numbers(text, (2,), "LOW,HIGH")
    if not 0 <= low < high <= 100:
        raise _bad(f"expected 0 <= LOW < HIGH <= 100, got {low:g},{high:g}")
    return [low, high]


def slices_arg(text: str) -> tuple:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise _bad(f"expected FIRST:LAST, two slice numbers such as 10:20, got {text!r}")
    first, last = int(m[1]), int(m[2])
    if first > last:
        raise _bad(f"the first slice must not come after the last, got {text!r}")
    return first, last


AXIS_CHOICES = f"{', '.join(AXES)} or 0, 1, 2 (array axes K, J, I)"


def axis_arg(text: str):
    t = text.strip()
    if t in ("0", "1", "2"):
        return int(t)
    if t.lower() in (a.lower() for a in AXES):
        return t
    raise _bad(f"expected {AXIS_CHOICES}, got {text!r}")


def device_arg(text: str) -> str:
    t = text.strip().lower()
    if t not in DEVICES and not re.fullmatch(r"cuda:\d+", t):
        raise _bad(f"expected {', '.join(DEVICES)} or cuda:N, got {text!r}")
    return t


def volume_pair_arg(text: str) -> List[str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise _bad(f"expected IMAGE,LABELMAP (a volume and its label map), got {text!r}")
    return parts


def head_blocks_arg(text: str) -> tuple:
    try:
        blocks = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise _bad(f"expected four whole numbers such as 3,4,6,3, got {text!r}") from None
    if len(blocks) != 4 or min(blocks) < 1:
        raise _bad(f"expected four whole numbers of at least 1, such as 3,4,6,3, got {text!r}")
    return blocks


def apm_prompts_arg(text: str) -> List[str]:
    kinds = [p.strip() for p in text.split(",")]
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= {"box", "points"}:
        raise _bad(f"expected box, points or box,points, got {text!r}")
    return kinds


def name_arg(text: str) -> str:
    if not text.strip():
        raise _bad("must not be empty")
    return text.strip()


def cluster_arg(text: str) -> str:
    t = text.strip()
    if t in ("ray", "auto") or (t.startswith("ray://") and len(t) > len("ray://")):
        return t
    raise _bad(f"expected ray, auto or ray://HOST:PORT, got {text!r}")
