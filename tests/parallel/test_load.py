"""Sliced loading: a tensor-parallel rank that reads only its slices of a Hugging Face folder
ends up with exactly the parameters it gets by loading the whole model and slicing it, for
split, replicated (norms, KV heads when tp > num_kv_heads) and tied or untied vocabulary
weights, with LoRA adapters and a linear head seeded the same way."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from engine.cli import compose
from engine.parallel.layout import Layout
from engine.parallel.mesh import init_mesh
from engine.parallel.spawn import spawn_ranks


def _write_model(folder: str, tie: bool) -> None:
    from engine.config import ModelConfig
    from engine.data.byte_tokenizer import byte_tokenizer
    from engine.model.args import ModelArgs
    from engine.model.hf_io import save_pretrained
    from engine.model.transformer import Transformer

    torch.manual_seed(3)
    args = ModelArgs.from_model_config(ModelConfig(family="qwen2", tie_word_embeddings=tie))
    save_pretrained(Transformer(args), folder)
    byte_tokenizer().save_pretrained(folder)


def _compare(rank: int, world: int, folder: str, out: str) -> None:
    from engine.data.byte_tokenizer import byte_tokenizer
    from engine.model.hf_io import CheckpointSlices
    from engine.parallel.load import load_local_shards
    from engine.parallel.parallelize import parallelize
    from engine.build import build_task_model

    torch.set_num_threads(1)
    mesh = init_mesh(Layout(tp=world), torch.device("cpu"))
    cfg, _ = compose([f"model.path={folder}", "task=reranker", "task.head=linear", "lora.rank=4"])
    cpu, tokenizer = torch.device("cpu"), byte_tokenizer()

    whole = parallelize(build_task_model(cfg, cpu, tokenizer), mesh, sequence_parallel=True)
    sliced = build_task_model(cfg, cpu, tokenizer, meta_backbone=True)
    parallelize(sliced, mesh, sequence_parallel=True,
                load_weights=lambda task: load_local_shards(task, CheckpointSlices(folder, task.backbone.args),
                                                            torch.float32, cpu))
    mismatched = []
    expected = dict(whole.named_parameters())
    for name, param in sliced.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        want = expected[name].to_local() if isinstance(expected[name], DTensor) else expected[name]
        if local.shape != want.shape or not torch.equal(local, want):
            mismatched.append(name)
    tied = sliced.backbone.lm_head.weight is sliced.backbone.model.embed_tokens.weight
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"mismatched": mismatched, "count": len(expected), "tied": tied,
                   "names_equal": set(expected) == {n for n, _ in sliced.named_parameters()}}, f)



@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_sliced_loading_equals_slicing_the_whole_model(tmp_path, tie):
    folder = str(tmp_path / "model")
    _write_model(folder, tie)
    world = 4  # 2 KV heads in the tiny model: tp 4 replicates them
    spawn_ranks(_compare, world, folder, str(tmp_path))
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.json") as f:
            result = json.load(f)
        assert result["names_equal"] and result["count"] > 10
        assert result["mismatched"] == [], f"rank {rank}: {result['mismatched']}"
        assert result["tied"] == tie


def test_a_tensor_the_folder_lacks_is_named(tmp_path):
    from engine.model.args import ModelArgs
    from engine.model.hf_io import CheckpointError, CheckpointSlices, read_hf_config

    folder = str(tmp_path / "model")
    _write_model(folder, tie=True)
    slices = CheckpointSlices(folder, ModelArgs.from_hf_config(read_hf_config(folder)))
    assert slices.read("model.norm.weight").shape == (64,)
    assert slices.read("model.embed_tokens.weight", (slice(0, 3),)).shape == (3, 64)  # only those rows
    with pytest.raises(CheckpointError, match="no weights for model.layers.9.mlp.up_proj.weight"):
        slices.read("model.layers.9.mlp.up_proj.weight")


def test_a_folder_that_disagrees_with_its_config_is_refused(tmp_path):
    """The sliced load checks shapes and stray tensors as the whole load does."""
    from engine.data.byte_tokenizer import byte_tokenizer
    from engine.model.hf_io import CheckpointError, CheckpointSlices
    from engine.parallel.load import load_local_shards
    from engine.build import build_task_model

    folder = str(tmp_path / "model")
    _write_model(folder, tie=True)
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path))
    config["intermediate_size"] = 2 * config["intermediate_size"]
    json.dump(config, open(config_path, "w"))
    cfg, _ = compose([f"model.path={folder}"])
    task = build_task_model(cfg, torch.device("cpu"), byte_tokenizer(), meta_backbone=True)
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight has shape .* config\.json makes it"):
        load_local_shards(task, CheckpointSlices(folder, task.backbone.args), torch.float32, torch.device("cpu"))

    config["intermediate_size"] //= 2
    config["num_hidden_layers"] = 1  # the folder holds a second layer the config no longer has
    json.dump(config, open(config_path, "w"))
    task = build_task_model(compose([f"model.path={folder}"])[0], torch.device("cpu"), byte_tokenizer(), meta_backbone=True)
    with pytest.raises(CheckpointError, match=r"unexpected model\.layers\.1\."):
        load_local_shards(task, CheckpointSlices(folder, task.backbone.args), torch.float32, torch.device("cpu"))
