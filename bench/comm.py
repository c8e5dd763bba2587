"""Bytes each collective moves in one tensor-parallel training step, beside Megatron's analytic volume.

    python bench/comm.py                  # tp 2 and 4, sequence parallelism on and off (about 25 s)
    python bench/comm.py --tp 2 --layers 2 --hidden 64 --heads 4 --kv-heads 2 --batch 2 --negatives 1
    python bench/comm.py --lora 8         # also --family qwen3, --kv-heads 2, --dp 2: see docs/performance.md

The script launches itself on tp x dp gloo processes (torch.multiprocessing), builds a random
Llama through the engine's Trainer (parallelize(): Megatron column/row layers, FSDP2 when
dp > 1) and runs one optimizer step (forward and backward of both towers, clip, AdamW) while
torch.distributed's collectives are wrapped to count what each one moves.

Per-rank volume convention (ring algorithms; a group of t ranks; E = elements of the full tensor):
all-gather and reduce-scatter move (t-1)/t x E, all-reduce 2(t-1)/t x E, broadcast E.

Megatron's analytic volume per transformer layer and step, for a forward pass over T tokens
(padded to a multiple of t under sequence parallelism) of hidden size h:
  with SP:    forward 2 all-gathers + 2 reduce-scatters of T x h, backward the same;
  without SP: forward 2 all-reduces of T x h, backward 2 all-reduces;
  either way 2(t-1)/t x 4 x T h elements, times the bytes of one element.
The embedding task runs its two towers (queries, documents) as one forward pass per step
(engine/tasks/base.py encode_together); with several passes (grad cache) their T add up.

Each collective is put where its forward ran: a decoder layer's activations (the term the
analytic volume counts), a layer's parameter gradients (norm weights under SP, LoRA, biases,
KV heads shared by ranks), or outside the layers (embedding, final gather, LM-head rows,
the trainer's clip norm). A collective in backward is attributed to the forward call of the
region map that issued it.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import tempfile
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import compose  # noqa: E402
from engine.config import validate  # noqa: E402
from engine.parallel import collectives as parallel_collectives  # noqa: E402
from engine.parallel import tensor as parallel_tensor  # noqa: E402
from engine.parallel.layout import layout_from_config  # noqa: E402
from engine.parallel.mesh import init_mesh  # noqa: E402
from engine.parallel.spawn import spawn_ranks  # noqa: E402
from engine.train.trainer import Trainer  # noqa: E402

# ---- what one collective moves ------------------------------------------------------------------

# torch.distributed function -> (what it is, elements E of the full tensor from its arguments).
# Both the older and the newer names (torch 2.13 renamed the tensor-in, tensor-out pair to
# *_single): they are wrapped on the torch.distributed namespace, where callers look them up,
# and the old names reach the new ones inside distributed_c10d, so nothing counts twice.
COLLECTIVES = {
    "all_reduce": ("all-reduce", lambda t, *a, **k: t.numel()),
    "all_gather_single": ("all-gather", lambda out, inp, *a, **k: out.numel()),
    "all_gather_into_tensor": ("all-gather", lambda out, inp, *a, **k: out.numel()),
    "_all_gather_base": ("all-gather", lambda out, inp, *a, **k: out.numel()),
    "all_gather": ("all-gather", lambda outs, t, *a, **k: t.numel() * len(outs)),
    "reduce_scatter_single": ("reduce-scatter", lambda out, inp, *a, **k: inp.numel()),
    "reduce_scatter_tensor": ("reduce-scatter", lambda out, inp, *a, **k: inp.numel()),
    "_reduce_scatter_base": ("reduce-scatter", lambda out, inp, *a, **k: inp.numel()),
    "reduce_scatter": ("reduce-scatter", lambda out, ins, *a, **k: sum(x.numel() for x in ins)),
    "all_to_all_single": ("all-to-all", lambda out, inp, *a, **k: inp.numel()),
    "broadcast": ("broadcast", lambda t, *a, **k: t.numel()),
}
# Per-rank share of E that a group of n ranks moves (ring algorithms).
FACTOR = {
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}
# The region maps (autograd functions) whose forward and backward issue the model's collectives.
REGION_MAPS = [parallel_collectives._Mapped]  # copy_to_tp, gather_from_sp, ..., all_gather_with_grad
LAYER = re.compile(r"\.layers\.(\d+)(\.|$)")


def _element_size(x) -> int:
    return (x[0] if isinstance(x, (list, tuple)) else x).element_size()


class CommCounter:
    """Wraps torch.distributed's collectives and the region maps for the duration of a `with`."""

    def __init__(self, model: nn.Module, groups: dict[str, object]):
        self.names = {id(m): name.removeprefix("backbone.") for name, m in model.named_modules()}
        self.groups = groups  # label -> process group
        self.rows = defaultdict(lambda: [0, 0, 0.0, 0.0])  # key -> calls, full elements, moved elements, bytes
        self.module_stack: list[str] = []
        self.site: tuple[str, str] | None = None  # (where, kind) of the region map now running
        self.tokens: list[int] = []  # tokens of each forward pass, as the embedding sees them
        self._undo = []
        self._signatures = {}

    # -- attribution --
    def _where(self) -> str:
        for name in reversed(self.module_stack):
            if name:
                return name
        return "outside modules" if not self.module_stack else "task"

    @staticmethod
    def _is_parameter(x) -> bool:
        """A parameter read through .to_local() (or a plain one): its gradient is what moves."""
        if isinstance(x, nn.Parameter):
            return True
        return x.grad_fn is not None and "ToTorchTensor" in type(x.grad_fn).__name__

    def _group_label(self, group) -> str:
        # The tp group object may be the default group itself (tp = world): named groups first;
        # group=None (the trainer's clip norm) stays "world".
        for label, known in self.groups.items():
            if group is not None and group is known:
                return label
        if group is None or group is dist.group.WORLD:
            return "world"
        return "ranks " + ",".join(map(str, dist.get_process_group_ranks(group)))

    # -- the wrappers --
    def _count(self, op: str, args, kwargs) -> None:
        kind_of_op, full_of = COLLECTIVES[op]
        # Positional and keyword calls alike (FSDP2 passes output=, input=): signature order.
        bound = self._signatures[op].bind(*args, **kwargs).arguments
        group, args = bound.get("group"), list(bound.values())
        full = full_of(*args)
        moved = FACTOR[kind_of_op](dist.get_world_size(group)) * full
        where, kind = self.site if self.site else (self._where(), "other")
        if torch._C._current_graph_task_id() != -1:  # inside autograd's backward
            phase = "backward"
        else:
            phase = "forward" if self.module_stack else "step"  # step: clip norm, logged loss
        key = (self._group_label(group), where, kind, phase, kind_of_op)
        row = self.rows[key]
        row[0] += 1
        row[1] += full
        row[2] += moved
        row[3] += moved * _element_size(args[1] if kind_of_op == "reduce-scatter" else args[0])

    def _wrap_collective(self, op: str) -> None:
        original = getattr(dist, op, None)
        if original is None:  # a name this torch does not have
            return
        self._signatures[op] = inspect.signature(original)

        def counted(*args, **kwargs):
            self._count(op, args, kwargs)
            return original(*args, **kwargs)

        setattr(dist, op, counted)
        self._undo.append(lambda: setattr(dist, op, original))

    def _wrap_region_map(self, cls) -> None:
        forward, backward = cls.forward, cls.backward

        def counted_forward(ctx, x, *rest):
            ctx.bench_site = (self._where(), "param-grad" if self._is_parameter(x) else "activation")
            outer, self.site = self.site, ctx.bench_site
            try:
                return forward(ctx, x, *rest)
            finally:
                self.site = outer

        def counted_backward(ctx, *grads):
            outer, self.site = self.site, ctx.bench_site
            try:
                return backward(ctx, *grads)
            finally:
                self.site = outer

        cls.forward, cls.backward = staticmethod(counted_forward), staticmethod(counted_backward)

        def undo():
            cls.forward, cls.backward = staticmethod(forward), staticmethod(backward)

        self._undo.append(undo)

    def __enter__(self):
        for op in COLLECTIVES:
            self._wrap_collective(op)
        for cls in REGION_MAPS:
            self._wrap_region_map(cls)

        def enter(module, args):
            self.module_stack.append(self.names.get(id(module), ""))
            if isinstance(module, parallel_tensor.VocabParallelEmbedding):
                self.tokens.append(args[0].numel())  # after padding to the SP multiple

        def leave(module, args, output):
            self.module_stack.pop()

        hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
                 nn.modules.module.register_module_forward_hook(leave)]
        self._undo.extend(h.remove for h in hooks)
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()

    # -- results --
    def summary(self, num_layers: int) -> tuple[list[dict], list[float]]:
        """Rows with the layer index folded away ("layers"), per-layer activation volume kept."""
        out = defaultdict(lambda: [0, 0, 0.0, 0.0])
        per_layer = defaultdict(float)
        for (group, where, kind, direction, op), row in self.rows.items():
            match = LAYER.search(where)
            region = "layers" if match else where
            if match and kind == "activation" and group == "tp":
                per_layer[int(match.group(1))] += row[3]
            key = (group, region, kind, direction, op)
            for i in range(4):
                out[key][i] += row[i]
        rows = [dict(zip(("group", "where", "kind", "pass", "op"), k), calls=v[0], full=v[1], moved=v[2], bytes=v[3])
                for k, v in out.items()]
        return rows, [per_layer.get(i, 0.0) for i in range(num_layers)]


class DispatchedCollectives(TorchDispatchMode):
    """Counts collectives at the dispatcher, below torch.distributed's Python functions and
    DTensor's functional collectives alike: a check that none escaped CommCounter's wrappers."""

    NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func._schema.name.partition("::")
        if namespace in self.NAMESPACES and not name.startswith(("barrier", "monitored_barrier", "wait")):
            self.calls += 1
        return func(*args, **(kwargs or {}))


# ---- one configuration on every rank -------------------------------------------------------------


def write_data(folder: str, n: int) -> str:
    """Retrieval lines of a few dozen bytes each (byte-level tokenizer: one token per byte)."""
    colors = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as f:
        for k in range(n):
            color = colors[k % len(colors)]
            negs = [c for c in colors if c != color][:3]
            line = {"query": f"what colour is the item number {k}?", "pos": [f"the item number {k} is {color}"],
                    "neg": [f"the item number {k} is {c}" for c in negs]}
            f.write(json.dumps(line) + "\n")
    return path


def overrides(args, tp: int, sp: bool, data: str, run_dir: str) -> list[str]:
    model = [f"model.family={args.family}", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
             f"model.num_heads={args.heads}", f"model.num_kv_heads={args.kv_heads}",
             f"model.intermediate_size={args.hidden * 3}"]
    return model + [
        "task=embedding", "task.pooling=mean", f"task.num_negatives={args.negatives}",
        "task.query_instruction=", "task.instruction=",
        f"train.batch_size={args.batch}", "train.tensorboard=false", "train.num_threads=1",
        "data.query_max_len=64", "data.doc_max_len=64", "data.max_len=128",
        f"lora.rank={args.lora}", f"parallel.tp={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
        f"data.train={data}", "data.eval=", f"train.output_dir={run_dir}",
    ]


def measure(args, tp: int, sp: bool, world: int, data: str, run_dir: str) -> dict:
    cfg, yaml = compose(overrides(args, tp, sp, data, run_dir))
    validate(cfg)
    mesh = init_mesh(layout_from_config(cfg.parallel, world_size=world), torch.device("cpu"))
    trainer = Trainer(cfg, yaml, mesh)
    groups = {"tp": mesh.group("tp"), "dp_sp": mesh.group("dp_sp"), "dp": mesh.group("dp")}
    with CommCounter(trainer.model, groups) as counter, DispatchedCollectives() as seen:
        trainer.train_step()
    rows, per_layer = counter.summary(cfg.model.num_layers)
    counted_calls = sum(r["calls"] for r in rows)
    # Every rank of a tp group must move the same volume (dp replicas see other queries, so
    # they may differ): compare the totals within each tp group.
    mine = torch.tensor([sum(r["bytes"] for r in rows)], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(tp)]
    dist.all_gather(every, mine, group=mesh.group("tp"))
    dtype = trainer.autocast_dtype or next(trainer.model.parameters()).dtype  # the activations' dtype
    element = torch.empty((), dtype=dtype).element_size()
    return {
        "tp": tp, "sp": sp, "dp": world // tp, "layers": cfg.model.num_layers, "hidden": cfg.model.hidden_size,
        "lora": cfg.lora.rank, "family": cfg.model.family, "tokens": counter.tokens, "element_bytes": element,
        "rows": rows, "per_layer_bytes": per_layer, "rank_bytes": [float(x) for x in every],
        "calls_counted": counted_calls, "calls_seen": seen.calls,
    }


def _measure_rank(rank: int, world: int, args, data: str, out: str) -> list[dict]:
    tp = world // args.dp
    return [measure(args, tp, sp, world, data, os.path.join(out, f"run-{sp}-{rank}")) for sp in args.sp]


# ---- the report ---------------------------------------------------------------------------------


def analytic_per_layer(result: dict) -> float:
    """2(t-1)/t x 4 x T h elements per layer and step, summed over the step's forward passes, in bytes."""
    t, h = result["tp"], result["hidden"]
    return 2 * (t - 1) / t * 4 * sum(result["tokens"]) * h * result["element_bytes"]


def _kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


def report(result: dict) -> dict:
    t, layers = result["tp"], result["layers"]
    rows = sorted(result["rows"], key=lambda r: (r["group"] != "tp", r["where"] != "layers", r["kind"], r["where"],
                                                 r["pass"] != "forward", r["op"]))
    sp = "on" if result["sp"] else "off"
    mode = f"LoRA r={result['lora']}" if result["lora"] else "full fine-tuning"
    print(f"\n== tp {t} x dp {result['dp']}, sequence parallel {sp}, {result['family']}, {mode}: {layers} layers, "
          f"hidden {result['hidden']}, "
          f"tokens per forward pass {result['tokens']}")
    print(f"{'group':<6} {'where':<20} {'kind':<10} {'pass':<8} {'op':<14} {'calls':>5} {'full elems':>11} "
          f"{'moved elems':>12} {'KiB':>9}")
    for r in rows:
        print(f"{r['group']:<6} {r['where'][:20]:<20} {r['kind']:<10} {r['pass']:<8} {r['op']:<14} {r['calls']:>5} "
              f"{r['full']:>11,} {r['moved']:>12,.0f} {_kib(r['bytes']):>9}")
    analytic = analytic_per_layer(result)
    per_layer = result["per_layer_bytes"]
    layer_act = sum(per_layer)
    tp_rows = [r for r in rows if r["group"] == "tp"]
    tp_total = sum(r["bytes"] for r in tp_rows)
    extras = tp_total - layer_act
    mean = layer_act / layers
    print(f"per layer, tp activations: measured {_kib(mean)} KiB (layers: {', '.join(_kib(b) for b in per_layer)}), "
          f"analytic 2({t}-1)/{t} x 4 x {sum(result['tokens'])} x {result['hidden']} x {result['element_bytes']} B "
          f"= {_kib(analytic)} KiB, ratio {mean / analytic:.4f}")
    print(f"whole step, tp group: {_kib(tp_total)} KiB = {layers} layers x analytic "
          f"x {tp_total / (layers * analytic):.4f} "
          f"(extras outside the layers' activations: {_kib(extras)} KiB, {extras / tp_total:.1%})")
    other = sum(r["bytes"] for r in rows if r["group"] != "tp")
    if other:
        print(f"other groups (dp_sp/dp/world: FSDP2, cross-rank negatives, clip norm, logged loss): "
              f"{_kib(other)} KiB ({other:,.0f} B), not part of the TP volume")
    spread = max(result["rank_bytes"]) - min(result["rank_bytes"])
    print(f"ranks of the tp group agree: {'yes' if spread == 0 else f'NO, spread {spread:.0f} bytes'}; "
          f"collectives counted {result['calls_counted']}, seen at the dispatcher {result['calls_seen']}")
    return {"layer_ratio": mean / analytic, "step_ratio": tp_total / (layers * analytic),
            "complete": result["calls_counted"] == result["calls_seen"] and spread == 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dp", type=int, default=1, help="data-parallel degree (world = tp x dp)")
    parser.add_argument("--sp", choices=["on", "off"], nargs="+", default=["on", "off"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="queries per step")
    parser.add_argument("--negatives", type=int, default=3, help="hard negatives per query")
    parser.add_argument("--family", default="llama", help="llama | qwen2 | qwen3 (q/k norms) | mistral")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    args = parser.parse_args(argv)
    if min(args.tp) < 2:
        parser.error("--tp: tensor-parallel degrees of 2 or more (tp 1 moves nothing to count)")
    args.sp = [s == "on" for s in args.sp]

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, gloo on CPU")
    print("convention: per-rank elements moved; for a group of t ranks and a full tensor of E elements, "
          "all-gather and reduce-scatter (t-1)/t x E, all-reduce 2(t-1)/t x E")
    summary = []
    with tempfile.TemporaryDirectory() as out:
        data = write_data(out, 4 * args.batch)
        for tp in args.tp:
            world = tp * args.dp
            for result in spawn_ranks(_measure_rank, world, args, data, out, timeout_s=600)[0]:
                    ratios = report(result)
                    name = f"tp{tp}{' sp' if result['sp'] else ''}"
                    summary.append((name, ratios))
    layer = ", ".join(f"{n} {r['layer_ratio']:.3f}" for n, r in summary)
    step = ", ".join(f"{n} {r['step_ratio']:.3f}" for n, r in summary)
    complete = all(r["complete"] for _, r in summary)
    print(f"\nsummary: measured / analytic Megatron TP volume per layer: {layer}; whole step incl. extras: {step}; "
          f"counting {'complete' if complete else 'INCOMPLETE'}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
