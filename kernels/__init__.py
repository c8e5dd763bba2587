"""Ember's compute kernels: each one beside its PyTorch reference and a dispatcher.

Kept import-free on purpose: Hugging Face also ships a package named `kernels`, and
transformers probes that name at import time (`is_kernels_available`). This package
defines no `__version__`, so the probe reports it unavailable, and importing it costs
nothing. Import the kernels themselves from their subpackages (`kernels.attention`).
"""
