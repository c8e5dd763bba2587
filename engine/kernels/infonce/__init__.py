"""InfoNCE over a large candidate pool without the (B, N) logits matrix.

    lse = candidate_lse(q, k, positive, temperature=0.05, group_size=G, false_negative_margin=0.1)
    loss = info_nce_loss(q, k, positive, temperature=0.05, group_size=G, false_negative_margin=0.1).mean()

q (B, d) queries, k (N, d) candidates, positive (B,) each query's positive in k. The result
is the float32 log-sum-exp of each query's kept logits, differentiable w.r.t. q and k; the
candidate rules (own group only, false-negative margin, positive always kept) and the two
hooks a loss uses (exclude_positive, extra_lse: outside terms joining the sum) are spelled
out in reference.py, the spec. Three implementations share the signature:
    reference.py   the whole logits matrix: the spec, for tests
    chunked.py     PyTorch, row tiles: what runs on CPU ("torch")
    triton.py      Triton kernels: what runs on CUDA ("triton"); imported on first use only

'auto' is the module default (set_infonce_backend), and a default of 'auto' means Triton
for CUDA tensors (when triton is installed) and the chunked PyTorch path otherwise.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

from torch import Tensor

from engine.kernels.infonce.chunked import chunked_candidate_lse
from engine.kernels.infonce.reference import candidate_lse_reference, positive_scores

BACKENDS = ("auto", "torch", "triton")
_default_backend = "auto"


def set_infonce_backend(name: str) -> None:
    """The backend candidate_lse(..., backend="auto") uses; "auto" restores the device rule."""
    global _default_backend
    _check_backend(name)
    _default_backend = name


def get_infonce_backend() -> str:
    return _default_backend


def resolve_backend(name: str, device_type: str) -> str:
    """The concrete backend ("torch" or "triton") that `name` stands for on `device_type`."""
    _check_backend(name)
    if name == "auto":
        name = _default_backend
    if name == "auto":
        # CUDA wheels of torch ship triton; a build without it still trains, on the torch path.
        on_gpu = device_type == "cuda" and importlib.util.find_spec("triton") is not None
        name = "triton" if on_gpu else "torch"
    if name == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"infonce backend 'triton' needs CUDA tensors (got {device_type}) or TRITON_INTERPRET=1 set "
            "before triton is imported"
        )
    return name


def candidate_lse(
    q: Tensor,
    k: Tensor,
    positive: Tensor,
    *,
    temperature: float,
    group_size: int | None = None,
    false_negative_margin: float | None = None,
    exclude_positive: bool = False,
    extra_lse: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """lse (B,) float32 of each query's kept candidates; see reference.candidate_lse_reference."""
    _check_inputs(q, k, positive, temperature, group_size)
    kwargs = dict(temperature=temperature, group_size=group_size, false_negative_margin=false_negative_margin,
                  exclude_positive=exclude_positive, extra_lse=extra_lse)
    if resolve_backend(backend, q.device.type) == "triton":
        triton_path = importlib.import_module("engine.kernels.infonce.triton")
        return triton_path.triton_candidate_lse(q, k, positive, **kwargs)
    return chunked_candidate_lse(q, k, positive, **kwargs)


def info_nce_loss(q: Tensor, k: Tensor, positive: Tensor, *, temperature: float, **kwargs) -> Tensor:
    """Per-query InfoNCE loss (B,): lse_i - q_i.k_{positive_i} / temperature.

    The positive's logit is computed once in torch and enters the sum as extra_lse
    (exclude_positive), so the term it subtracts is the very same tensor: a query that
    keeps nothing else gets exactly zero loss and gradient, not a rounding residue.
    """
    positive_logit = positive_scores(q, k, positive) / temperature  # (B,)
    lse = candidate_lse(q, k, positive, temperature=temperature, exclude_positive=True, extra_lse=positive_logit,
                        **kwargs)
    return lse - positive_logit


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"infonce backend {name!r} is not one of {', '.join(BACKENDS)}")


def _check_inputs(q: Tensor, k: Tensor, positive: Tensor, temperature: float, group_size: int | None) -> None:
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"candidate_lse: expected q (B, d) and k (N, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if positive.shape != (q.shape[0],) or positive.dtype.is_floating_point:
        raise ValueError(f"candidate_lse: positive must be integer indices of shape ({q.shape[0]},), "
                         f"got {positive.dtype} {tuple(positive.shape)}")
    if temperature <= 0:
        raise ValueError(f"candidate_lse: temperature={temperature} must be > 0")
    if group_size is not None and group_size < 1:
        raise ValueError(f"candidate_lse: group_size={group_size} must be >= 1")


__all__ = [
    "BACKENDS",
    "candidate_lse",
    "candidate_lse_reference",
    "get_infonce_backend",
    "info_nce_loss",
    "positive_scores",
    "resolve_backend",
    "set_infonce_backend",
]
