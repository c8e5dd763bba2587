"""Pipeline schedules measured: the bubble of each against (p-1)/(v m + p-1), and the activation
memory each keeps per stage.

    python bench/pipeline.py                          # pp 4, m = 4, 8, 16 (about 40 s)
    python bench/pipeline.py --pp 2 --micro 2 4 --work-ms 10
    python bench/pipeline.py --what memory --layers 8 --tokens 512 --hidden 256

Both run the engine's own executor (engine/train/pipeline.py's PipelineSchedule: the timeline,
the batched point-to-point exchanges of p2p.py) on pp gloo processes.

bubble   Each stage's work is a timed wait (a forward `--work-ms` per rank, split over its virtual
         stages; a backward twice that, Megatron's assumption), so the pp processes need no cores
         of their own and the measurement is the schedule's, whatever the machine. The bubble is
         1 - work / wall, wall from the barrier before the pass to the last rank's end, work the
         waits of one rank (every rank's are equal); beside it the formula and the timeline's own
         count, which includes nothing of the transfers' cost.
memory   A random Llama cut into stages (keep_stage), a packed batch of `--tokens` per
         micro-batch through forward_backward: the bytes of the tensors autograd saves for
         backward, counted as they are saved and freed (saved_tensors_hooks), peak per rank; beside
         the timeline's peak of micro-batch layers in flight times one layer's measured bytes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import weakref

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.batch import PackedSequences  # noqa: E402
from engine.parallel.spawn import spawn_ranks  # noqa: E402
from engine.train.pipeline import PipelineSchedule  # noqa: E402
from engine.train.pipeline_timeline import bubble_formula, bubble_fraction, peak_layers_in_flight  # noqa: E402

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)]


# ---- bubble: stages whose work is a timed wait ------------------------------------------------

class _Work(torch.autograd.Function):
    """Waits `seconds` in forward and twice that in backward; passes its input through."""

    @staticmethod
    def forward(ctx, x, seconds: float):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class _Chunk:
    def __init__(self, index: int, chunks: int):
        self.index, self.embedding, self.head = index, index == 0, index == chunks - 1


class TimedStage:
    """What PipelineSchedule needs of a stage (engine/parallel/pipeline/stage.py's PipelineStage),
    with a timed wait as each chunk's work."""

    def __init__(self, rank: int, pp: int, virtual: int, seconds: float):
        self.rank, self.size, self.virtual = rank, pp, virtual
        self.chunks = {c: _Chunk(c, pp * virtual) for c in range(rank, pp * virtual, pp)}
        self.seconds = seconds / virtual  # a rank's work per micro-batch, split over its chunks
        self.weight = torch.ones(4, requires_grad=True)

    def chunk(self, index: int) -> _Chunk:
        return self.chunks[index]

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def hidden_shape(self, seqs) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def forward(self, index: int, seqs, received):
        x = self.weight * 1.0 if self.chunks[index].embedding else received
        return _Work.apply(x, self.seconds)


def _bubble_rank(rank: int, world: int, micro: list[int], work_ms: float, repeats: int) -> list[dict]:
    group = dist.group.WORLD
    rows = []
    for kind, virtual in SCHEDULES:
        for m in micro:
            stage = TimedStage(rank, world, virtual, work_ms / 1000)
            schedule = PipelineSchedule(stage, kind, group, torch.float32, torch.device("cpu"))
            walls = []
            for _ in range(repeats + 1):  # the first pass warms up
                dist.barrier()
                start = time.perf_counter()
                schedule.forward_backward([None] * m, lambda index, rows: rows.sum())
                walls.append(time.perf_counter() - start)
            rows.append({"schedule": kind, "virtual": virtual, "m": m, "walls": walls[1:]})
    return rows


def bench_bubble(args) -> list[dict]:
    per_rank = spawn_ranks(_bubble_rank, args.pp, args.micro, args.work_ms, args.repeats, timeout_s=600)
    results = []
    print(f"bubble: pp {args.pp}, forward {args.work_ms} ms per rank per micro-batch, backward 2x; gloo, "
          f"best of {args.repeats} passes")
    print(f"{'schedule':<14}{'m':>4}{'measured':>10}{'timeline':>10}{'formula':>10}{'step ms':>10}")
    for i, row in enumerate(per_rank[0]):
        # A pass ends when its last rank does (the optimizer step waits for every stage): per repeat the
        # slowest rank's wall, then the best repeat.
        wall = min(max(walls) for walls in zip(*(rank_rows[i]["walls"] for rank_rows in per_rank)))
        kind, virtual, m = row["schedule"], row["virtual"], row["m"]
        measured = 1 - m * 3 * args.work_ms / 1000 / wall
        counted = bubble_fraction(kind, args.pp, virtual, m)
        formula = bubble_formula(args.pp, virtual, m)
        name = kind + (f" v{virtual}" if virtual > 1 else "")
        print(f"{name:<14}{m:>4}{measured:>10.3f}{counted:>10.3f}{formula:>10.3f}{wall * 1000:>10.0f}")
        results.append({"schedule": kind, "virtual": virtual, "m": m, "measured": measured, "timeline": counted,
                        "formula": formula})
    return results


# ---- memory: a real model's saved activations ---------------------------------------------------

class SavedBytes:
    """Bytes of the tensors autograd holds for backward, now and at peak (each storage counted once)."""

    def __init__(self):
        self.live, self.peak, self.refs = 0, 0, {}

    def _pack(self, tensor):
        key = tensor.untyped_storage().data_ptr()
        holder = _Held(tensor)
        if key not in self.refs:
            self.refs[key] = 0
            self.live += tensor.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(holder, self._release, key, tensor.untyped_storage().nbytes())
        return holder

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor)


class _Held:
    def __init__(self, tensor):
        self.tensor = tensor


def _model(args, virtual: int):
    from engine.config import TaskConfig
    from engine.model.args import ModelArgs
    from engine.model.transformer import Transformer
    from engine.tasks import EmbeddingTask

    torch.manual_seed(0)
    backbone = Transformer(ModelArgs(family="llama", vocab_size=256, hidden_size=args.hidden,
                                     intermediate_size=args.hidden * 2, num_layers=args.layers, num_heads=4,
                                     num_kv_heads=2))
    for p in backbone.parameters():  # saved activations are what is measured, not parameter grads
        p.requires_grad_(False)
    backbone.model.embed_tokens.weight.requires_grad_(True)
    return EmbeddingTask(backbone, TaskConfig(type="embedding", pooling="mean"))


def _micro_batches(args, m: int) -> list[PackedSequences]:
    g = torch.Generator().manual_seed(1)
    length = args.tokens // 4
    return [PackedSequences.from_token_lists([torch.randint(1, 256, (length,), generator=g).tolist()
                                              for _ in range(4)]) for _ in range(m)]


def _memory_rank(rank: int, world: int, args, m: int) -> list[dict]:
    from engine.parallel.pipeline.stage import PipelineStage, keep_stage, plan_for

    rows = []
    for kind, virtual in SCHEDULES:
        task = _model(args, virtual)
        plan = plan_for(task, world, virtual)
        keep_stage(task, plan.chunks_of(rank))
        schedule = PipelineSchedule(PipelineStage(task, plan, rank), kind, dist.group.WORLD, torch.float32,
                                    torch.device("cpu"))
        saved = SavedBytes()
        with saved.hooks():
            schedule.forward_backward(_micro_batches(args, m), lambda index, out: out.sum())
        rows.append({"schedule": kind, "virtual": virtual, "peak": saved.peak, "layers": len(plan.layers_of(rank))})
    return rows


def _one_layer_bytes(args) -> int:
    """Saved bytes of one micro-batch through one decoder layer (the unit the timeline counts)."""
    one = argparse.Namespace(**{**vars(args), "layers": 2})
    task = _model(one, 1)
    seqs = _micro_batches(args, 1)[0]
    totals = []
    for layers in (1, 2):
        saved = SavedBytes()
        with saved.hooks():
            backbone = task.backbone
            stream = backbone.lay_out(seqs.input_ids, seqs.position_ids, seqs.cu_seqlens, seqs.max_seqlen)
            x = backbone.run_layers(backbone.embed(stream), stream, list(backbone.model.layers)[:layers])
        totals.append(saved.peak)
        del x
    return totals[1] - totals[0]


def bench_memory(args) -> list[dict]:
    from engine.model.args import ModelArgs
    from engine.parallel.pipeline.stages import plan_stages

    m = args.micro[-1]
    per_rank = spawn_ranks(_memory_rank, args.pp, args, m, timeout_s=600, threads=None)
    layer = _one_layer_bytes(args)
    margs = ModelArgs(family="llama", vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                      num_layers=args.layers, num_heads=4, num_kv_heads=2)
    print(f"activation memory: pp {args.pp}, {args.layers} layers, hidden {args.hidden}, {m} micro-batches of "
          f"{args.tokens} tokens; one layer of one micro-batch saves {layer / 2**20:.2f} MiB")
    print(f"{'schedule':<14}" + "".join(f"{'stage ' + str(r) + ' MiB':>14}" for r in range(args.pp))
          + f"{'  in flight (layers x micro-batches, timeline)'}")
    results = []
    for i, (kind, virtual) in enumerate(SCHEDULES):
        peaks = [rank_rows[i]["peak"] for rank_rows in per_rank]
        in_flight = peak_layers_in_flight(kind, plan_stages(margs, args.pp, virtual, head_rows=False), m)
        name = kind + (f" v{virtual}" if virtual > 1 else "")
        print(f"{name:<14}" + "".join(f"{p / 2**20:>14.1f}" for p in peaks) + "  " + " ".join(map(str, in_flight)))
        results.append({"schedule": kind, "virtual": virtual, "peaks": peaks, "in_flight": in_flight,
                        "layer_bytes": layer})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=["bubble", "memory", "both"], default="both")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16], help="micro-batches per pass")
    parser.add_argument("--work-ms", type=float, default=20.0, help="bubble: forward work per rank per micro-batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8, help="memory: decoder layers (pp x 2 at least)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512, help="memory: tokens per micro-batch")
    args = parser.parse_args(argv)
    if args.what in ("bubble", "both"):
        bench_bubble(args)
    if args.what in ("memory", "both"):
        bench_memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
