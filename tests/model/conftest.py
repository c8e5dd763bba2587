"""Fixtures for the model tests; the tiny HF models themselves are built in hf_tiny.py."""
from __future__ import annotations

import pytest

from hf_tiny import random_hf_model


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """variant -> (HF model, folder written by transformers), built once per test module."""
    made = {}

    def get(variant: str):
        if variant not in made:
            folder = tmp_path_factory.mktemp(f"hf_{variant}")
            model = random_hf_model(variant)
            model.save_pretrained(str(folder))
            made[variant] = (model, str(folder))
        return made[variant]

    return get
