"""The two callbacks every long job takes (torch-free): progress and cancel."""

from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Callable[[int, Optional[int]], None]  # (units done, units in all or None when not known)
CancelFn = Callable[[], bool]  # True: stop at the next safe point (``errors.Cancelled`` is raised)
