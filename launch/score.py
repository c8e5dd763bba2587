"""Write teacher scores: an Ember reranker scores every line's positives and negatives, and the
lines are written back as they were with pos_scores / neg_scores set (what task.loss=distill reads).

    python launch/score.py model.path=outputs/demo_reranker/export data.train=mined.jsonl score.output=scored.jsonl
    torchrun --nproc_per_node=2 launch/score.py ...     # the pairs are shared out over the ranks

model.path is an exported reranker or any Hugging Face folder of a supported family (then the
reranker task's defaults, or task.* / data.max_len as on the command line). score.* options (also
as --flags): output (required), batch_size. The last line printed is a JSON object.
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
from engine.mine.teacher import ScoreOptions  # noqa: E402


def main(argv: list[str]) -> int:
    hydra_argv, options = split_argv(argv, "score", ScoreOptions)
    if not options.output:
        raise ConfigError("score.output is required: the JSONL file to write (score.output=PATH)")
    if options.batch_size < 1:
        raise ConfigError(f"score.batch_size={options.batch_size} must be >= 1")
    # A Hugging Face folder is scored as a reranker; an export's own task wins unless task= is named.
    default_task = [] if any(a.lstrip("+").startswith("task=") for a in hydra_argv) else ["task=reranker"]
    cfg, _ = compose(default_task + hydra_argv)
    if not cfg.model.path:
        raise ConfigError("model.path is required: the reranker (an Ember export or a Hugging Face model folder)")
    train_file = input_file(cfg)

    from engine.data.formats import load_examples
    from engine.mine.cli import start_ranks
    from engine.parallel.mesh import shutdown

    examples = load_examples(train_file, on_error=cfg.data.on_error)
    mesh = start_ranks(cfg.train.device, cfg.train.collective_timeout)
    finished = False
    try:
        _score(cfg, hydra_argv, options, examples, mesh)
        finished = True
    finally:
        shutdown(mesh, finished=finished)
    return 0


def _score(cfg, argv, o: ScoreOptions, examples, mesh) -> None:
    import time

    from engine.api import Reranker
    from engine.export import settings_from_export
    from engine.mine.cli import load_model
    from engine.mine.teacher import scored_records, teacher_scores
    from engine.mine.write import write_jsonl

    settings = settings_from_export(cfg, argv, cfg.model.path)
    reranker = load_model(Reranker, cfg.model.path, settings, cfg.train.device, "model.path")
    reranker.task.dp_group = mesh.group("dp")
    start = time.perf_counter()
    scores = teacher_scores(reranker, examples, o.batch_size, progress=mesh.is_logging_rank)
    seconds = time.perf_counter() - start
    if not mesh.is_logging_rank:
        return
    lines = write_jsonl(o.output, scored_records(cfg.data.train, examples, scores))
    pairs = sum(len(p) + len(n) for p, n in scores)
    print(f"scored {pairs:,} pairs of {lines:,} lines from {cfg.data.train} with {cfg.model.path} "
          f"in {seconds:.1f} s; wrote {o.output}", file=sys.stderr)
    print(json.dumps({"output": o.output, "lines": lines, "pairs": pairs, "seconds": seconds}))


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    run_cli(main)
