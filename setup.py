"""ember-engine: a Megatron-style training engine for embedding and reranker models."""
from setuptools import find_packages, setup

setup(
    name="ember-engine",
    version="0.1.0",
    description="Train embedding and reranker models on decoder LLM backbones at any layout",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*"]),
    install_requires=[
        # torch is installed first by the Makefile (`pip install torch==2.13.0` on CPU machines);
        # this range then installs nothing more.
        "torch>=2.6",
        "transformers>=4.51",
        "safetensors",
        "hydra-core>=1.3",
        "triton; platform_system == 'Linux'",
        "tqdm",
        "numpy",
        # Every export loads itself as a server would (engine/export_parity.py).
        "sentence-transformers",
        "peft",
    ],
    extras_require={
        # Optional GPU back-ends, imported lazily behind the kernels dispatcher.
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
        # Interop checks, the demo's model conversion, training curves (matplotlib), TensorBoard events, faiss.
        "test": ["pytest", "pytrec-eval-terrier", "sentence-transformers", "peft", "gguf", "datasets", "matplotlib",
                 "faiss-cpu", "tensorboard"],
        "tensorboard": ["tensorboard"],
    },
)
