"""Ember's compute kernels (import name `engine.kernels`): each beside its PyTorch reference and
a dispatcher.

    attention/   varlen attention: PyTorch spec, per-block LSE path, Triton FlashAttention-2, flash-attn
    infonce/     InfoNCE candidate log-sum-exp: whole-matrix spec, chunked PyTorch, Triton
    lora.py      a LoRA-adapted linear as one autograd node (merged into fp32 weights per call)
    select.py    the run's one choice of backends (config `kernels.*`), checked against the device

Why not a top-level `kernels` package: Hugging Face ships one of that name, and transformers
(5.25+) requires and imports it; any folder called `kernels/` with an `__init__.py` on sys.path
ahead of site-packages (the repository root under pytest or `python -c`) would shadow it. See
docs/kernels.md. Import the kernels from their subpackages (`engine.kernels.attention`); this
file imports nothing, so importing it costs nothing.
"""
