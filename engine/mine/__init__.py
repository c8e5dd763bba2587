"""Hard-negative mining and teacher scores for training files (launch/mine.py, launch/score.py).

Mining follows sentence-transformers' `mine_hard_negatives` rule for rule (docs/mining.md):

    options.py   the mine.* options (sentence-transformers' names) and the range_max rule
    corpus.py    queries and candidate corpus, deduplicated as sentence-transformers does
    encode.py    many texts through an Ember model, over the job's ranks, with progress and a cache
    search.py    the best-scoring candidates per query: faiss or exact torch.topk
    select.py    exclusions, margins and score filters, top / random choice: the spec's steps
    rerank.py    the reranker's veto on likely false negatives
    pipeline.py  one mining run, from examples to each query's negatives
    write.py     the mined FlagEmbedding JSONL
    summary.py   the text report (counts, statistics, histograms)
    teacher.py   teacher scores from a reranker (launch/score.py)
    cli.py       the command line, models and ranks both scripts share
"""
