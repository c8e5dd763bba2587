"""Layout rules for context parallelism: Ulysses needs whole heads per rank, ring does not."""
from __future__ import annotations

import pytest

from engine.config import ConfigError
from engine.model.args import ModelArgs
from engine.parallel.layout import Layout, check_model_fits_layout


def _args(heads, kv_heads):
    return ModelArgs(family="llama", vocab_size=512, hidden_size=16 * heads, intermediate_size=64, num_layers=2,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=16)


@pytest.mark.parametrize("heads,kv,layout", [
    (4, 2, Layout(ulysses=2)), (4, 2, Layout(ulysses=4)), (8, 8, Layout(ulysses=4)), (64, 8, Layout(tp=8, ulysses=4)),
    (4, 2, Layout(tp=2, ulysses=2)), (6, 2, Layout(ring=4)), (6, 3, Layout(ring=2, ulysses=3)),
])
def test_layouts_that_work(heads, kv, layout):
    check_model_fits_layout(_args(heads, kv), layout)


@pytest.mark.parametrize("heads,kv,layout,says", [
    (6, 2, Layout(ulysses=4), "num_heads=6 query heads do not split over 4 ranks"),
    (8, 2, Layout(tp=4, ulysses=4), "num_heads/tp=8/4=2 query heads do not split over 4 ranks"),
    (12, 3, Layout(ulysses=2), "3 KV heads per tp rank neither split over nor repeat evenly to 2 ranks"),
])
def test_ulysses_without_whole_heads_is_refused_with_ring_suggested(heads, kv, layout, says):
    with pytest.raises(ConfigError) as error:
        check_model_fits_layout(_args(heads, kv), layout)
    assert says in str(error.value) and f"parallel.ring={layout.ulysses}" in str(error.value)
