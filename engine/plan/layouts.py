"""The layouts a cluster allows for an experiment: each checked by the rules a launch checks
(engine/parallel/layout.py), planned (memory.py, communication.py, step_time.py), refused when it
does not fit in a GPU's memory, and the fitting ones ranked by estimated step time.

Candidates: every tp x pp x ulysses x ring x dp = cluster.gpus with tp within a node
(cluster.gpus_per_node); pipelines run the experiment's schedule when it is not interleaved, else
1F1B (the experiment's own layout keeps its virtual stages).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from engine.config import ConfigError, parse_bytes
from engine.parallel.layout import Layout, check_trainable_layout, layout_from_config
from engine.plan.communication import GroupTraffic, traffic_per_step
from engine.plan.memory import MemoryPlan, Precision, micro_batches_per_pass, plan_memory, planned_device
from engine.plan.step_time import StepTime, step_time
from engine.train.pipeline_timeline import bubble_fraction


@dataclass(frozen=True)
class LayoutPlan:
    layout: Layout
    memory: MemoryPlan
    traffic: list[GroupTraffic]
    time: StepTime
    fits: bool
    is_experiment: bool


@dataclass(frozen=True)
class ClusterPlan:
    gpus: int
    usable_bytes: int  # per GPU: gpu_memory - reserved_memory
    experiment: LayoutPlan | None  # None when the experiment's own layout breaks a rule at this size
    experiment_error: str | None
    ranked: list[LayoutPlan]  # the fitting layouts, fastest first
    too_big: list[LayoutPlan]  # planned but over usable_bytes, smallest first
    broken: int  # candidates that break a launch rule


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(gpus: int, gpus_per_node: int) -> list[Layout]:
    layouts = []
    for tp in _divisors(gpus):
        if tp > gpus_per_node:
            continue
        for pp in _divisors(gpus // tp):
            for ulysses in _divisors(gpus // (tp * pp)):
                for ring in _divisors(gpus // (tp * pp * ulysses)):
                    layouts.append(Layout(tp, pp, ulysses, ring, gpus // (tp * pp * ulysses * ring)))
    return layouts


def config_for(cfg, layout: Layout):
    """The experiment's config with this layout's degrees (what `parallel.*=` overrides would give)."""
    schedule = cfg.parallel.pp_schedule if layout.virtual > 1 or cfg.parallel.pp_schedule != "interleaved" else "1f1b"
    parallel = replace(cfg.parallel, tp=layout.tp, pp=layout.pp, ulysses=layout.ulysses, ring=layout.ring,
                       pp_virtual=layout.virtual, pp_schedule=schedule, world_size=layout.world_size)
    return replace(cfg, parallel=parallel)


def plan_layout(cfg, args, layout: Layout, usable_bytes: int, is_experiment: bool) -> LayoutPlan:
    """Raises ConfigError when a launch would refuse the layout."""
    cfg = config_for(cfg, layout)
    check_trainable_layout(cfg, layout, args)
    device = planned_device(cfg)
    memory = plan_memory(cfg, args, layout, device=device)
    traffic = traffic_per_step(cfg, args, layout, Precision.of(cfg.model, device))
    bubble = 0.0
    if layout.pp > 1:
        bubble = bubble_fraction(cfg.parallel.pp_schedule, layout.pp, layout.virtual, micro_batches_per_pass(cfg, layout))
    return LayoutPlan(layout, memory, traffic, step_time(cfg, args, layout, traffic, bubble),
                      memory.total <= usable_bytes, is_experiment)


def plan_cluster(cfg, args) -> ClusterPlan:
    c = cfg.cluster
    gpus = c.gpus or cfg.parallel.world_size
    if gpus <= 0:
        raise ConfigError("cluster.gpus=0 and parallel.world_size=0: give the GPUs to plan for (cluster.gpus=128)")
    usable = parse_bytes("cluster.gpu_memory", c.gpu_memory) - parse_bytes("cluster.reserved_memory", c.reserved_memory)
    if usable <= 0:
        raise ConfigError(f"cluster.reserved_memory={c.reserved_memory} leaves nothing of cluster.gpu_memory={c.gpu_memory}")
    experiment, experiment_error = None, None
    try:
        own = layout_from_config(cfg.parallel, gpus)
        experiment = plan_layout(cfg, args, own, usable, True)
    except ConfigError as err:
        own, experiment_error = None, str(err)
    plans, broken = [], 0
    for layout in candidate_layouts(gpus, c.gpus_per_node):
        if layout == own:
            continue
        try:
            plans.append(plan_layout(cfg, args, layout, usable, False))
        except ConfigError:
            broken += 1
    if experiment is not None:
        plans.append(experiment)
    ranked = sorted((p for p in plans if p.fits), key=lambda p: p.time.total_s)
    too_big = sorted((p for p in plans if not p.fits), key=lambda p: p.memory.total)
    return ClusterPlan(gpus, usable, experiment, experiment_error, ranked, too_big, broken)
