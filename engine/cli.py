"""What every entry point in launch/ shares: Hydra composition over conf/, and turning
user mistakes into one line on stderr and a non-zero exit instead of a traceback."""
from __future__ import annotations

import os
import sys
from typing import Callable

from omegaconf import OmegaConf

from engine.config import ConfigError, RunConfig, register_configs
from engine.model.gguf import default_cache_dir

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
EXIT_USER_ERROR = 2


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("ember_cache"):
        OmegaConf.register_new_resolver("ember_cache", default_cache_dir)
    if not OmegaConf.has_resolver("ember_repo"):  # the repository root, for files shipped with it
        OmegaConf.register_new_resolver("ember_repo", lambda: os.path.dirname(CONF_DIR))


def compose(overrides: list[str], config_name: str = "train") -> tuple[RunConfig, str]:
    """Compose conf/<config_name>.yaml with command-line overrides; return the typed config and its YAML."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    register_configs()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            node = hydra_compose(config_name=config_name, overrides=overrides)
        OmegaConf.resolve(node)
        cfg: RunConfig = OmegaConf.to_object(node)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_unparsable_override(overrides) or _one_line(err)) from None
    except (AttributeError, AssertionError) as err:
        # OmegaConf's own slips on odd merges (a dict into a null node): still the user's line, not a traceback.
        raise ConfigError(_one_line(err)) from None
    return cfg, OmegaConf.to_yaml(node)


def _unparsable_override(overrides: list[str]) -> str | None:
    """Hydra's grammar errors do not say which argument broke; find it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception as err:  # noqa: BLE001 (any parse failure names this argument)
            reason = str(err).strip().splitlines()[0]
            return (f"cannot parse the argument {override!r}: {reason} "
                    "(quote values with special characters: key='value')")
    return None


def _one_line(err: BaseException) -> str:
    """Hydra/OmegaConf errors span many lines; keep what names the key and the problem."""
    cause = err.__cause__ or err
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    head = lines[0] if lines else "invalid configuration"
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    options = [line for line in str(err).splitlines() if line.startswith("\t") and "provider=" not in line]
    if "Available options" in str(err) and options:
        head += " (available: " + ", ".join(o.strip() for o in options) + ")"
    return f"{key}: {head}" if key and key not in head else head


USAGE = """usage: python {prog} [KEY=VALUE ...] [+exp=NAME]
  Hydra-style overrides over conf/{config}.yaml, e.g. task=reranker train.max_steps=5 model.path=DIR.
  Every key is documented in docs/config.md."""


def user_error_types() -> tuple[type[Exception], ...]:
    """Mistakes in what the user handed in (config, data, model folders, templates): no traceback."""
    from engine.data.formats import DataError
    from engine.data.templates import TemplateError
    from engine.eval.metrics import MetricsInputError
    from engine.eval.retrieval import EvalDataError
    from engine.losses import LossInputError
    from engine.model.args import ModelArgsError
    from engine.model.gguf import GGUFError
    from engine.model.hf_io import CheckpointError
    from engine.model.lora import LoRAError

    return (ConfigError, DataError, TemplateError, EvalDataError, ModelArgsError, GGUFError, CheckpointError,
            LoRAError, MetricsInputError, LossInputError)


def rank_prefix() -> str:
    """Under torchrun every rank reports its own failure, each line saying which rank it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def run_cli(main: Callable[[list[str]], int | None], config_name: str = "train") -> None:
    """Run main(argv); user errors (config, data, files) print one line each and exit 2."""

    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(prog=os.path.relpath(sys.argv[0]), config=config_name))
        sys.exit(0)
    try:
        code = main(argv)
    except user_error_types() as err:
        prefix = "config error: " if isinstance(err, ConfigError) else ""
        print(f"{rank_prefix()}{prefix}{err}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    _exit(code or 0)


def _exit(code: int) -> None:
    """One of several ranks leaves without interpreter finalization: gloo's worker threads can
    abort a rank that finished its work while Python tears down (pytorch#179291), which turned
    a finished run into a failed one under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    import logging

    from engine.parallel.mesh import leave_process

    logging.shutdown()
    leave_process(code)
