"""Two torchrun "nodes" on localhost (--nnodes=2, c10d rendezvous on 127.0.0.1, 2 processes each) find
each other and train the tiny experiment to the one-process losses (dp 4; 1e-4 relative, the tolerance
of every layout against one process in tests/parallel/test_launch.py)."""
from __future__ import annotations

import os
import subprocess
import sys

from engine.parallel.spawn import free_port
from tests.cluster.conftest import TINY, TRAIN, assert_same_losses, env, losses
from tests.conftest import REPO


def test_two_nodes_meet_at_a_c10d_rendezvous_and_train_to_the_one_process_losses(one_process_losses, tmp_path):
    port = free_port()
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=ember-test",
               TRAIN, *TINY, f"train.output_dir={tmp_path / 'run'}"]
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    for process in nodes:
        out, _ = process.communicate(timeout=300)
        logs.append(out)
        assert process.returncode == 0, out[-4000:]
    log = "\n".join(logs)
    assert "[ember] launch: 4 processes on 2 node(s), 2 per node, met at " in log, log[-4000:]
    assert "layout world 4 = pp 1 x dp 4" in log, log[-4000:]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000006")
    assert_same_losses(losses(tmp_path / "run"), one_process_losses, rel=1e-4)
