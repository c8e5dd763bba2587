"""The planner's tables as text (launch/plan.py prints them; docs/performance.md carries two)."""
from __future__ import annotations

from engine.plan.layouts import ClusterPlan, LayoutPlan
from engine.plan.memory import GiB

GROUPS = ("tp", "ulysses", "ring", "pp", "dp_sp")
HEADER = ("layout", "weights", "grads", "optim", "activ", "work", "comm", "total GiB",
          *(f"{g} GB" for g in GROUPS), "compute s", "comm s", "step s")


def layout_name(plan: LayoutPlan) -> str:
    lay = plan.layout
    name = f"tp{lay.tp} pp{lay.pp}" + (f"v{lay.virtual}" if lay.virtual > 1 else "")
    name += f" u{lay.ulysses} r{lay.ring} dp{lay.dp}"
    return ("* " if plan.is_experiment else "  ") + name


def row(plan: LayoutPlan) -> list[str]:
    stage = plan.memory.heaviest
    traffic = {g.group: g.bytes_per_step for g in plan.traffic}
    return [
        layout_name(plan),
        *(f"{getattr(stage, part) / GiB:.1f}" for part in
          ("weights", "grads", "optimizer", "activations", "workspace", "comm_buffers")),
        f"{stage.total / GiB:.1f}",
        *(f"{traffic[g] / 1e9:.0f}" if g in traffic else "-" for g in GROUPS),
        _seconds(plan.time.compute_s), _seconds(plan.time.communication_s), _seconds(plan.time.total_s),
    ]


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
            for r in rows]


def report(cfg, plan: ClusterPlan, top: int) -> list[str]:
    c = cfg.cluster
    lines = [
        f"plan for {plan.gpus} GPUs ({c.gpus_per_node} per node), {c.gpu_memory} each less {c.reserved_memory} "
        f"reserved = {plan.usable_bytes / GiB:.1f} GiB usable; step time at {c.mfu:.0%} MFU of "
        f"{c.peak_tflops:g} TFLOP/s, communication at {c.intra_node_bandwidth:g} GB/s within a node and "
        f"{c.inter_node_bandwidth:g} GB/s across, not overlapped",
        "memory per rank of the heaviest pipeline stage (GiB); GB each rank sends per step, per group; "
        "* = the experiment's layout (u = ulysses, r = ring)",
    ]
    rows = [list(HEADER)]
    if plan.experiment is not None:
        rows.append(row(plan.experiment))
    shown = [p for p in plan.ranked if not p.is_experiment][:top]
    rows += [row(p) for p in shown]
    lines += table(rows)
    if plan.experiment is None:
        lines.append(f"the experiment's layout cannot run on {plan.gpus} GPUs: {plan.experiment_error}")
    elif not plan.experiment.fits:
        lines.append(f"the experiment's layout does not fit: {plan.experiment.memory.total / GiB:.1f} GiB per rank "
                     f"> {plan.usable_bytes / GiB:.1f} GiB usable")
    else:
        place = plan.ranked.index(plan.experiment) + 1
        lines.append(f"the experiment's layout fits and ranks {place} of {len(plan.ranked)} fitting layouts")
    if plan.ranked:
        best = plan.ranked[0]
        lines.append(f"fastest fitting layout: {layout_name(best).strip()} "
                     f"(parallel.tp={best.layout.tp} parallel.pp={best.layout.pp} "
                     f"parallel.ulysses={best.layout.ulysses} parallel.ring={best.layout.ring}), "
                     f"{_seconds(best.time.total_s)} s per step")
    else:
        lines.append("no layout fits: lower data.max_len or the batch, use train.recompute=full, LoRA, or more GPUs")
    smallest = f" (smallest: {layout_name(plan.too_big[0]).strip()}, {plan.too_big[0].memory.total / GiB:.1f} GiB)" \
        if plan.too_big else ""
    lines.append(f"refused: {len(plan.too_big)} layouts that do not fit{smallest}; {plan.broken} that break a launch "
                 "rule (heads, vocabulary or layers not divisible, batch not divisible by dp x grad_accum)")
    return lines
