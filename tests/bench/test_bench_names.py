"""`python bench/X.py` puts bench/ first on sys.path: a bench file named like an installed top-level
module would shadow it for everything the bench imports (bench/kernels.py once hid Hugging Face's
`kernels`, which transformers imports, and every bench that loads transformers crashed)."""
import importlib.util
import os

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


def test_no_bench_script_shadows_an_installed_module():
    names = [f[:-3] for f in os.listdir(BENCH) if f.endswith(".py")]
    assert names, "no bench scripts found"
    shadowing = [name for name in names if importlib.util.find_spec(name) is not None]
    assert not shadowing, f"bench/ scripts named like installed modules: {shadowing}; rename them"
