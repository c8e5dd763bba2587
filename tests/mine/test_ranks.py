"""launch/mine.py under torchrun: each rank encodes its share of the corpus, the rows are gathered,
and rank 0 writes the file one process writes."""
from __future__ import annotations

import os
import subprocess
import sys

from engine.parallel.spawn import free_port
from tests.conftest import REPO


def mine_command(nproc: int, *args: str) -> list[str]:
    script = os.path.join(REPO, "launch", "mine.py")
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            script, *args]


def run(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(mine_command(nproc, *args), capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_write_what_one_writes(tmp_path, embedder_export, reranker_export, mining_file):
    """Byte for byte: the embeddings differ in float32 rounding only (each rank packs other
    batches), which moves no choice; the reranker's pairs are shared out as well."""
    common = [f"model.path={embedder_export}", f"data.train={mining_file}", "mine.relative_margin=0.01",
              "mine.sampling_strategy=random", "mine.range_min=1", f"mine.reranker={reranker_export}"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    first = run(1, *common, f"mine.output={one}")
    second = run(2, *common, f"mine.output={two}")
    assert "(2 ranks;" in second.stdout and "(1 rank;" in first.stdout
    assert open(one, "rb").read() == open(two, "rb").read()
    # The reports agree but for the header (ranks, times, output path) and the JSON line.
    assert first.stdout.splitlines()[3:-1] == second.stdout.splitlines()[3:-1]
    assert "Reranker: dropped" in first.stdout
