"""How idle OpenMP threads wait, set before torch is imported (it cannot change afterwards).

PyTorch's CPU kernels synchronise their threads hundreds of times per encoded slice. Measured on the
2-core AMD EPYC with the bf16 LiteMedSAM encoder (``Testing/benchmarks/speed.py``, median ms per encode,
fresh process each):

- libgomp's default (spin ~300,000 times, then sleep) with another busy process on the cores: 1250-1550
  (spinning threads steal the cores the working threads need), against 350 for sleeping at once;
- sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) on a quiet machine: about 6 % slower than spinning
  1,000 times first (mean ratio 0.944 over 6 alternating runs), which under load costs 7 % (375 vs 350).

So: a short spin then sleep (``GOMP_SPINCOUNT=1000`` for libgomp, the Linux wheels' OpenMP; PASSIVE
for the others). A user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` wins.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

SPIN_COUNT = "1000"


def set_default_waiting(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Set the waiting policy above in ``environ`` (default ``os.environ``) unless the user chose one.
    Returns whether it was set. Call before ``import torch``."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["GOMP_SPINCOUNT"] = SPIN_COUNT  # libgomp: takes precedence over PASSIVE's zero spins
    return True
