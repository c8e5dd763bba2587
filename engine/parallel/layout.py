"""The parallel layout as numbers: degrees, what the world size leaves for dp, and the
divisibility rules a model must meet. No process groups here (that is mesh.py's job)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from engine.config import ConfigError


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ulysses: int = 1
    ring: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.ulysses * self.ring * self.dp

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.ulysses * self.ring


def layout_from_config(parallel, world_size: int | None = None) -> Layout:
    p = parallel
    model_parallel = p.tp * p.pp * p.ulysses * p.ring
    if world_size is None:
        world_size = p.world_size or int(os.environ.get("WORLD_SIZE", "0")) or model_parallel
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel: tp*pp*ulysses*ring = {p.tp}*{p.pp}*{p.ulysses}*{p.ring} = {model_parallel} "
            f"does not divide the world size {world_size}"
        )
    return Layout(p.tp, p.pp, p.ulysses, p.ring, world_size // model_parallel)


def check_model_fits_layout(args, layout: Layout, seq_len: int) -> None:
    """One line per violated rule, naming the numbers and what would work."""
    if args.num_heads % layout.tp:
        raise ConfigError(f"num_heads={args.num_heads} is not divisible by parallel.tp={layout.tp}")
    if layout.tp > args.num_kv_heads and layout.tp % args.num_kv_heads:
        raise ConfigError(
            f"parallel.tp={layout.tp} must divide or be a multiple of num_kv_heads={args.num_kv_heads}"
        )
    if layout.tp <= args.num_kv_heads and args.num_kv_heads % layout.tp:
        raise ConfigError(f"num_kv_heads={args.num_kv_heads} is not divisible by parallel.tp={layout.tp}")
    if args.intermediate_size % layout.tp:
        raise ConfigError(f"intermediate_size={args.intermediate_size} is not divisible by parallel.tp={layout.tp}")
    if args.num_layers < layout.pp:
        raise ConfigError(f"num_layers={args.num_layers} is fewer than parallel.pp={layout.pp} stages")
    sp = layout.ulysses
    if args.num_heads % (layout.tp * sp):
        raise ConfigError(
            f"num_heads={args.num_heads} is not divisible by parallel.tp*parallel.ulysses={layout.tp * sp}"
        )
    # Zigzag ring attention cuts each sequence into 2*ring chunks.
    chunks = layout.ulysses * layout.ring * (2 if layout.ring > 1 else 1)
    if seq_len % chunks:
        raise ConfigError(f"sequence length {seq_len} is not divisible by the {chunks} sequence-parallel chunks")
