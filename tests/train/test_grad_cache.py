"""grad_cache_step gives the parameter gradients of one big graph, dropout included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.losses import info_nce
from engine.train.grad_cache import GradCacheError, grad_cache_step
from tests.gpu import requires_gpu

NUM_QUERIES, GROUP_SIZE, FEATURES = 5, 3, 12


class TinyEncoder(nn.Module):
    """An MLP over fixed random features with dropout, standing in for a LoRA backbone."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 8))

    def forward(self, features):
        return F.normalize(self.net(features), dim=-1)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(NUM_QUERIES, FEATURES, generator=g)
    docs = torch.randn(NUM_QUERIES * GROUP_SIZE, FEATURES, generator=g)
    return queries, docs


def loss_fn(outputs):
    q, d = outputs
    return info_nce(q, d, group_size=GROUP_SIZE, temperature=0.05, query_query=True, doc_doc=True)


def towers_for(query_encoder, doc_encoder, chunk: int, seed: int = 0):
    queries, docs = batch(seed)
    return [(query_encoder, list(queries.split(chunk))), (doc_encoder, list(docs.split(chunk)))]


def plain_step(towers):
    """One graph through every chunk, in the order grad-cache embeds them (same dropout draws)."""
    outputs = [torch.cat([encode(chunk) for chunk in chunks]) for encode, chunks in towers]
    loss = loss_fn(outputs)
    loss.backward()
    return loss.detach()


def grads(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


def zero(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("chunk", [1, 4, 6, 100])  # 4 and 6: uneven last chunks; 100: one chunk
@pytest.mark.parametrize("shared", [True, False])  # one bi-encoder, or a query and a doc tower
def test_grad_cache_matches_one_graph_with_dropout(chunk, shared):
    query_encoder = TinyEncoder(seed=1).train()
    doc_encoder = query_encoder if shared else TinyEncoder(seed=2).train()
    modules = (query_encoder,) if shared else (query_encoder, doc_encoder)

    torch.manual_seed(123)
    ref_loss = plain_step(towers_for(query_encoder, doc_encoder, chunk))
    ref_grads = grads(*modules)
    ref_next = torch.rand(4)  # where the random stream stands after the step
    zero(*modules)

    torch.manual_seed(123)
    loss = grad_cache_step(towers_for(query_encoder, doc_encoder, chunk), loss_fn)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(*modules), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # Replays fork the RNG: the rest of the step sees the stream one plain pass leaves.
    torch.testing.assert_close(torch.rand(4), ref_next)

    # The comparison is not vacuous: other dropout masks give other gradients.
    zero(*modules)
    torch.manual_seed(999)
    plain_step(towers_for(query_encoder, doc_encoder, chunk))
    assert any(not torch.allclose(g, r, rtol=1e-3) for g, r in zip(grads(*modules), ref_grads))


def test_grad_cache_accumulates_into_existing_grads():
    encoder = TinyEncoder(seed=3).eval()  # deterministic: two steps must simply add
    torch.manual_seed(0)
    plain_step(towers_for(encoder, encoder, 2))
    once = grads(encoder)
    grad_cache_step(towers_for(encoder, encoder, 2), loss_fn)
    for got, want in zip(grads(encoder), once):
        torch.testing.assert_close(got, 2 * want, rtol=1e-5, atol=1e-7)


def test_tower_unused_by_the_loss_gets_no_gradient():
    used, unused = TinyEncoder(seed=4), TinyEncoder(seed=5)
    queries, docs = batch()
    towers = [(used, list(queries.split(2))), (unused, list(docs.split(2)))]
    grad_cache_step(towers, lambda outputs: outputs[0].pow(2).sum())
    assert all(p.grad is not None for p in used.parameters())
    assert all(p.grad is None for p in unused.parameters())


def test_grad_cache_rejects_empty_towers():
    with pytest.raises(GradCacheError, match="at least one tower"):
        grad_cache_step([(TinyEncoder(seed=6), [])], loss_fn)


@requires_gpu("needs a CUDA GPU: the replay of the CUDA generator's state")
def test_grad_cache_replays_cuda_dropout():
    """On a GPU, dropout draws from the CUDA generator: the replay must restore that state, not only
    the CPU one, or the re-embedded chunks get other masks than the cached embeddings had."""
    query_encoder = TinyEncoder(seed=1).cuda().train()

    def on_cuda(chunk_size):
        return [(query_encoder, [c.cuda() for c in chunks]) for _, chunks in towers_for(None, None, chunk_size)]

    torch.manual_seed(123)
    ref_loss = plain_step(on_cuda(2))
    ref_grads = grads(query_encoder)
    zero(query_encoder)
    torch.manual_seed(123)
    loss = grad_cache_step(on_cuda(2), loss_fn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(query_encoder), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
