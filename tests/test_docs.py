"""Every config key is documented, and every experiment composes."""
from __future__ import annotations

import dataclasses
import os

from engine.config import RunConfig
from tests.conftest import REPO


def test_every_config_key_is_in_docs_config_md():
    text = open(os.path.join(REPO, "docs", "config.md")).read()
    missing = []
    for section in dataclasses.fields(RunConfig):
        for field in dataclasses.fields(section.type if isinstance(section.type, type) else getattr(
                __import__("engine.config", fromlist=["x"]), section.type)):
            key = f"{section.name}.{field.name}"
            if f"`{key}`" not in text and f"`{key} `" not in text and key not in text:
                missing.append(key)
    assert not missing, f"undocumented config keys: {missing}"


def test_every_experiment_composes():
    from engine.cli import compose

    for name in sorted(os.listdir(os.path.join(REPO, "conf", "exp"))):
        cfg, _ = compose([f"+exp={name.removesuffix('.yaml')}"])
        assert cfg.train.output_dir
