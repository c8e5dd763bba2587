"""Our top-level `kernels` package must not confuse transformers.

Hugging Face ships a hub package also called `kernels`, and transformers probes that
name (`is_kernels_available`, which may import it to read a version). With our package
first on sys.path, transformers must still import, report hub kernels unavailable, and
run a model normally, while `kernels.attention` stays ours. A fresh interpreter makes
the import order real (the test session may have imported either package already).
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import os, sys
import kernels                       # ours, imported before transformers on purpose
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils.import_utils import is_kernels_available

repo = sys.argv[1]
assert os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.join(repo, "kernels"), kernels.__file__
assert not is_kernels_available(), "transformers took our kernels package for Hugging Face's"

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 64, (2, 5))
with torch.no_grad():
    logits = model(ids).logits
assert logits.shape == (2, 5, 64) and torch.isfinite(logits).all()

from kernels.attention import attention
from kernels.attention.reference import attention_reference
q = torch.randn(5, 4, 8); k = v = torch.randn(5, 2, 8)
cu = torch.tensor([0, 5], dtype=torch.int32)
assert torch.equal(attention(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True),
                   attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True))
print("ok")
"""


def test_transformers_works_beside_our_kernels_package():
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", SCRIPT, REPO], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
