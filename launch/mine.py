"""Mine hard negatives for a JSONL training file with an Ember embedder, as sentence-transformers'
mine_hard_negatives does (same options, same choices); write the engine's FlagEmbedding JSONL.

    python launch/mine.py model.path=outputs/demo/export data.train=train.jsonl mine.output=mined.jsonl
    python launch/mine.py model.path=DIR data.train=FILE mine.output=OUT mine.range_min=10 mine.range_max=50 \
        mine.relative_margin=0.05 mine.num_negatives=5 mine.sampling_strategy=random
    python launch/mine.py model.path=SMOLLM2_DIR task.pooling=mean data.train=FILE --output OUT --reranker RERANKER
    torchrun --nproc_per_node=2 launch/mine.py ...     # the encoding is shared out over the ranks

model.path is an exported embedder (its ember_task.json sets templates, EOS and pooling) or any
Hugging Face folder of a supported family (then task.pooling, task.query_template,
task.query_instruction, task.doc_template, task.append_eos, task.normalize and data.*_len as the
command line sets them, +exp=... included, else their defaults). mine.* options (also as --flags): output (required),
range_min, range_max, max_score, min_score, absolute_margin, relative_margin, num_negatives,
sampling_strategy (top|random), seed, output_format (lines|n-tuple|triplet), output_scores,
batch_size, faiss_batch_size, use_faiss, cache_folder, corpus, corpus_from_negatives, reranker,
reranker_margin, reranker_batch_size. docs/mining.md describes each. The summary is printed and
written beside the output (.summary.txt); the last line printed is a JSON object.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.host_memory import request_huge_pages  # noqa: E402

request_huge_pages()  # before torch is imported: torch reads it at its first allocation

from engine.cli import compose, run_cli  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.mine.cli import input_file, split_argv  # noqa: E402
from engine.mine.options import MineOptions, check  # noqa: E402


def main(argv: list[str]) -> int:
    hydra_argv, options = split_argv(argv, "mine", MineOptions)
    check(options)
    cfg, _ = compose(hydra_argv)
    if not cfg.model.path:
        raise ConfigError("model.path is required: the embedder (an Ember export or a Hugging Face model folder)")
    train_file = input_file(cfg)

    from engine.data.formats import load_examples
    from engine.mine.corpus import line_negatives, read_corpus_file
    from engine.mine.search import faiss_or_none

    faiss_or_none(options.use_faiss)  # mine.use_faiss=true without faiss fails now, not after encoding
    examples = load_examples(train_file, on_error=cfg.data.on_error)
    extra = read_corpus_file(options.corpus) if options.corpus else []
    if options.corpus_from_negatives:
        extra += line_negatives(examples)
    return _with_ranks(cfg, hydra_argv, options, examples, extra)


def _with_ranks(cfg, argv, options: MineOptions, examples, extra) -> int:
    from engine.mine.cli import start_ranks
    from engine.parallel.mesh import shutdown

    mesh = start_ranks(cfg.train.device, cfg.train.collective_timeout)
    finished = False
    try:
        _mine(cfg, argv, options, examples, extra, mesh)
        finished = True
    finally:
        shutdown(mesh, finished=finished)
    return 0


def _mine(cfg, argv, o: MineOptions, examples, extra, mesh) -> None:
    from engine.api import Embedder, Reranker
    from engine.export import settings_from_export
    from engine.mine.cli import load_model, model_key
    from engine.mine.pipeline import mine

    settings = settings_from_export(cfg, argv, cfg.model.path)
    embedder = load_model(Embedder, cfg.model.path, settings, cfg.train.device, "model.path")
    reranker = None
    if o.reranker:
        # Its own folder's settings (or the reranker defaults): the command line's task.* are the embedder's.
        from engine.mine.cli import settings_of_folder

        reranker = load_model(Reranker, o.reranker, settings_of_folder(o.reranker, "reranker"), cfg.train.device,
                              "mine.reranker")
    for model in (embedder, reranker):
        if model is not None:
            model.task.dp_group = mesh.group("dp")  # encode_tokens shares texts out over it
    lead = mesh.is_logging_rank
    result = mine(examples, embedder, o, model_key=model_key(cfg.model.path, embedder, settings[2]), extra=extra,
                  reranker=reranker, progress=lead, write_cache=lead)
    if lead:
        _write(cfg, o, examples, result, world=mesh.layout.world_size)


def _write(cfg, o: MineOptions, examples, result, world: int) -> None:
    from engine.mine.summary import render, summary_path
    from engine.mine.write import mined_records, write_jsonl

    mset = result.mset
    by_index = [dict(zip(row, scores.tolist())) for row, scores in zip(mset.positives, result.positive_scores)]
    lines = write_jsonl(o.output, mined_records(examples, mset, result.found, by_index, o.output_format,
                                                o.num_negatives, o.output_scores))
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    header = [
        f"mined {cfg.data.train} with {cfg.model.path} ({world} rank{'s' if world > 1 else ''}; {timing})",
        f"{len(examples):,} lines, {len(mset.queries):,} unique queries, a corpus of {len(mset.corpus):,} texts; "
        f"{result.search} search, range_min={o.range_min} range_max={result.range_max} "
        f"num_negatives={o.num_negatives} sampling_strategy={o.sampling_strategy}",
        f"wrote {lines:,} lines ({o.output_format}) to {o.output}",
    ]
    text = render(header, result.positive_scores, result.found, result.skipped, vars(o), result.notes)
    with open(summary_path(o.output), "w", encoding="utf-8") as f:
        f.write(text)
    print(text, end="")
    print(json.dumps({"output": o.output, "summary": summary_path(o.output), "lines": lines,
                      "queries": len(mset.queries), "corpus": len(mset.corpus),
                      "negatives": sum(len(f) for f in result.found), "seconds": result.seconds}))


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    run_cli(main)
