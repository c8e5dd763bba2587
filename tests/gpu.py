"""GPU-only tests: marked `gpu` so bench/gpu/check.sh selects them (`pytest -m gpu`), and skipped
where no CUDA device is present (the development machines and CI have none)."""
from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()


def requires_gpu(reason: str, also: bool = True):
    """Decorator: the test runs only with a CUDA device (and `also`, e.g. a package being installed)."""

    def apply(test):
        return pytest.mark.gpu(pytest.mark.skipif(not (CUDA and also), reason=reason)(test))

    return apply
