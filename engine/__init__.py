"""Ember: a Megatron-style training engine for embedding and reranker models.

The Python API: `engine.Embedder` and `engine.Reranker` (see engine/api.py). They are
imported lazily so that `import engine` stays light.
"""

__all__ = ["Embedder", "Reranker"]


def __getattr__(name):
    if name in __all__:
        from engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
