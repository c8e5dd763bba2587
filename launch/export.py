"""Export a training checkpoint as a Hugging Face folder (sentence-transformers, transformers, vLLM).

The export ends by loading the folder as a server would and comparing with the engine
(docs/serving.md); a difference is one line on stderr and exit code 2, and the files are
left in OUTPUT.unservable instead of OUTPUT.

    python launch/export.py checkpoint=outputs/demo/checkpoints/step_00000024 output=outputs/demo/export
    python launch/export.py checkpoint=DIR output=DIR export.merge_lora=false   # a PEFT adapter folder
    python launch/export.py checkpoint=DIR output=DIR export.dtype=bfloat16
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_cli  # noqa: E402
from engine.config import ConfigError  # noqa: E402

_KEYS = {"checkpoint", "output", "export.merge_lora", "export.dtype"}


def parse(argv: list[str]) -> dict[str, str]:
    values = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in _KEYS:
            raise ConfigError(f"unknown argument {arg!r}: expected checkpoint=DIR output=DIR "
                              "[export.merge_lora=true|false] [export.dtype=float32|bfloat16|float16]")
        values[key] = value
    for required in ("checkpoint", "output"):
        if not values.get(required):
            raise ConfigError(f"{required}=... is required")
    if not os.path.isdir(values["checkpoint"]):
        raise ConfigError(f"checkpoint={values['checkpoint']}: no such folder")
    if values.get("export.merge_lora", "true") not in ("true", "false"):
        raise ConfigError(f"export.merge_lora={values['export.merge_lora']!r} must be true or false")
    if values.get("export.dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"export.dtype={values['export.dtype']!r} is not one of float32, bfloat16, float16")
    return values


def main(argv: list[str]) -> int:
    from engine.export import export_checkpoint
    from engine.export_parity import ExportParityError

    values = parse(argv)
    merge = values.get("export.merge_lora")
    try:
        path = export_checkpoint(
            values["checkpoint"], values["output"],
            merge_lora=None if merge is None else merge == "true",
            dtype=values.get("export.dtype"),
        )
    except ExportParityError:
        raise  # not a configuration mistake: run_cli prints it as it is
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"exported {values['checkpoint']} to {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
