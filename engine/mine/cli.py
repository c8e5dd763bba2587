"""What launch/mine.py and launch/score.py share: their command line, their models, their ranks.

The command line is launch/evaluate.py's (Hydra-style `model.path=DIR data.train=FILE task.KEY=V`
over conf/train.yaml) plus the script's own options under a prefix, `mine.KEY=VALUE`; each may
also be written as a flag, `--KEY VALUE` or `--KEY=VALUE` (dashes for underscores; a flag with no
value is true). A model folder is an export (its ember_task.json sets the task and the lengths,
except what the command line names) or any Hugging Face folder of a supported family (then the
composed config's task.*, data.*_len and model.causal, +exp=... included), as in launch/evaluate.py.
"""
from __future__ import annotations

import os

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.config import ConfigError

def split_argv(argv: list[str], prefix: str, schema):
    """(the Hydra overrides, the typed `prefix.*` options: a schema dataclass instance)."""
    hydra, own = [], []
    args = iter(range(len(argv)))
    for i in args:
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                following = argv[i + 1] if i + 1 < len(argv) else None
                if following is None or following.startswith("--") or "=" in following:
                    value = "true"
                else:
                    value = following
                    next(args)
            own.append(f"{key.replace('-', '_')}={value}")
        elif arg.lstrip("+").startswith(prefix + "."):
            own.append(arg.lstrip("+")[len(prefix) + 1 :])
        else:
            hydra.append(arg)
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(own))
        return hydra, OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        lines = str(err).strip().splitlines()
        key = next((line.split(":", 1)[1].strip() for line in lines if "full_key:" in line), "")
        head = lines[0].replace(f"'{schema.__name__}'", f"the {prefix}.* options")
        raise ConfigError(f"{prefix}.{key}: {head}" if key else f"{prefix}.*: {head}") from None


def input_file(cfg) -> str:
    """data.train as the one file to read (the trainer also takes a list of files; these scripts do not)."""
    if not cfg.data.train:
        raise ConfigError("data.train is required: the JSONL file to read")
    if not isinstance(cfg.data.train, str):
        raise ConfigError(f"data.train={cfg.data.train}: give one file here (run once per file)")
    return cfg.data.train


def settings_of_folder(path: str, task_type: str):
    """(task, data, causal) of a folder by itself: its ember_task.json, else conf/'s task_type defaults."""
    from engine.cli import compose
    from engine.export import settings_from_export

    cfg, _ = compose([f"task={task_type}"])
    return settings_from_export(cfg, [], path)


def load_model(cls, path: str, settings, device_name: str, key: str):
    """An engine.Embedder or engine.Reranker (cls) from a folder with (task, data, causal) settings;
    a folder that is not a model, or a model of the other kind, is one line naming `key`."""
    from engine.api import load_task_model
    from engine.build import resolve_device
    from engine.host_memory import keep_freed_memory

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{key}={path}: no config.json there (an Ember export or a Hugging Face model folder)")
    task_cfg, data_cfg, causal = settings
    wanted = "embedding" if cls.__name__ == "Embedder" else "reranker"
    if task_cfg.type != wanted:
        kind = {"embedding": "an embedding", "reranker": "a reranker"}
        raise ConfigError(f"{key}={path} is {kind.get(task_cfg.type, task_cfg.type)} model here; {kind[wanted]} "
                          f"model is needed (an export of one, or task={wanted} for a Hugging Face folder)")
    keep_freed_memory()  # every encode batch frees and reallocates the same activations
    device = resolve_device(device_name)
    return cls(*load_task_model(path, task_cfg, data_cfg, causal, device), device)


def model_key(path: str, model, causal: bool) -> str:
    """What a model's vectors depend on, for the embedding cache: its folder (and when its files
    last changed: a new export to the same folder is a new model) and its settings."""
    changed = max(os.path.getmtime(os.path.join(path, name)) for name in os.listdir(path))
    return repr((os.path.abspath(path), changed, model.text_encoder.task, model.text_encoder.data, causal,
                 str(model.device)))


def start_ranks(device_name: str, timeout_s: int):
    """The job's ranks as one data-parallel group (None for a single process): engine.parallel.mesh
    starts torch.distributed as training does (gloo on CPU, nccl + gloo on GPUs)."""
    from engine.build import resolve_device
    from engine.parallel.layout import Layout
    from engine.parallel.mesh import init_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return init_mesh(Layout(dp=world), resolve_device(device_name), timeout_s)

