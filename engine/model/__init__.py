"""The decoder backbone (Llama / Qwen2 / Qwen3 / Mistral), LoRA, and Hugging Face I/O.

    args.py         ModelArgs: architecture, config.json mapping, parameter count
    transformer.py  Transformer: HF-named modules, packed (varlen) and padded forward
    attention.py    self-attention; the attention itself is kernels.attention's job
    rope.py norm.py mlp.py   the pieces of a block
    lora.py         LoRA layers, merging, PEFT adapter export
    hf_io.py        load_pretrained / save_pretrained (safetensors only)
    gguf.py         GGUF -> HF folder (the bundled SmolLM2 demo model)
See docs/model.md.
"""
from engine.model.args import ModelArgs
from engine.model.hf_io import load_pretrained, save_pretrained
from engine.model.lora import apply_lora, merge_lora, save_peft_adapter
from engine.model.transformer import Transformer

__all__ = ["ModelArgs", "Transformer", "apply_lora", "load_pretrained", "merge_lora", "save_peft_adapter",
           "save_pretrained"]
