"""Terminal progress bars for the command line (the library itself only calls plain callbacks)."""

from __future__ import annotations

import sys
from typing import Optional


def bar(desc: str, unit: str = "it") -> "Bar":
    return Bar(desc, unit)


class Bar:
    """A tqdm bar driven by ``(done, total)`` callbacks; silent when stderr is not a terminal."""

    def __init__(self, desc: str, unit: str):
        from tqdm import tqdm

        self._tqdm = tqdm(desc=desc, unit=unit, unit_scale=unit == "B", disable=not sys.stderr.isatty(), leave=False)

    def __call__(self, done: int, total: Optional[int]) -> None:
        if total is not None and self._tqdm.total != total:
            self._tqdm.total = total
        self._tqdm.n = done
        self._tqdm.refresh()

    def postfix(self, **values) -> None:
        self._tqdm.set_postfix(**values)

    def close(self) -> None:
        self._tqdm.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
