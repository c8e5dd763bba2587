"""The best-scoring corpus texts of every query: faiss' exact inner-product index, or torch.topk.

Both give (scores, indices) of shape (queries, k), best first, as sentence-transformers' mining
gets them: where the corpus has fewer than k texts the rows are padded with index -1 (score -inf
after torch.topk; faiss' own filler score, which the selection turns into -inf). Embeddings come
in L2-normalised, so an inner product is the cosine similarity.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from engine.config import ConfigError


def faiss_or_none(use_faiss: bool | None):
    """The faiss module where mine.use_faiss asks for it (null: where it is installed)."""
    if use_faiss is False:
        return None
    try:
        import faiss
    except ImportError:
        if use_faiss:
            raise ConfigError("mine.use_faiss=true but faiss is not installed (pip install faiss-cpu)") from None
        return None
    return faiss


def top_candidates(queries: np.ndarray, corpus: np.ndarray, k: int, faiss, batch: int,
                   progress: bool = False) -> tuple[Tensor, Tensor]:
    """(scores, indices) of the k best corpus rows per query row, `batch` queries at a time."""
    from tqdm import trange

    if faiss is not None:
        index = faiss.IndexFlatIP(corpus.shape[1])
        index.add(np.ascontiguousarray(corpus, dtype=np.float32))

        def search(chunk):
            return index.search(np.ascontiguousarray(chunk, dtype=np.float32), k)
        desc = "Querying FAISS index"
    else:
        corpus_t = torch.as_tensor(corpus)

        def search(chunk):
            # torch.topk refuses k above the corpus size: cap it, pad back up below.
            return torch.topk(torch.as_tensor(chunk) @ corpus_t.T, k=min(k, len(corpus)), dim=1)
        desc = "Computing similarity scores"
    scores, indices = [], []
    for start in trange(0, len(queries), batch, desc=desc, disable=not progress):
        chunk_scores, chunk_indices = search(queries[start : start + batch])
        scores.append(torch.as_tensor(chunk_scores))
        indices.append(torch.as_tensor(chunk_indices))
    scores, indices = torch.cat(scores), torch.cat(indices).long()
    missing = k - scores.size(1)
    if missing > 0:
        scores = torch.cat([scores, scores.new_full((scores.size(0), missing), -float("inf"))], dim=1)
        indices = torch.cat([indices, indices.new_full((indices.size(0), missing), -1)], dim=1)
    return scores, indices
