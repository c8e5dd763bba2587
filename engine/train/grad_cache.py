"""GradCache (Gao et al., 2021): a contrastive step over a large batch in small-memory chunks.

The InfoNCE loss couples every query with every document, so a batch cannot simply be split
into micro-batches without shrinking the negative pool. GradCache splits the *encoder* work
instead:
1. embed every chunk of every tower without a graph (activations freed chunk by chunk),
   remembering the RNG state before each chunk;
2. compute the loss on the cached embeddings, made leaves, and backpropagate to them only:
   d loss / d embedding is small (num_seqs x H);
3. re-embed each chunk with a graph, replaying its RNG state so dropout (LoRA dropout) draws
   the same masks, and backpropagate the cached embedding gradient through it.
Parameter gradients equal those of one big graph; peak activation memory is one chunk's.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

EncodeFn = Callable[[Any], Tensor]


class GradCacheError(ValueError):
    """grad_cache_step was handed towers it cannot run."""


class RandContext:
    """The CPU and accelerator RNG state at construction; `with ctx:` replays from it.

    Leaving the block restores whatever state the RNG had on entering, so a replay does not
    shift the random stream of the rest of the step (as GradCache's RandContext does).
    """

    def __init__(self) -> None:
        self.cpu_state = torch.get_rng_state()
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        self.device_type = None if accelerator is None else accelerator.type
        self.device_index = None if accelerator is None else torch.accelerator.current_device_index()
        self.device_state = (
            None if accelerator is None else torch.get_device_module(self.device_type).get_rng_state(self.device_index)
        )
        self._fork = None

    def __enter__(self) -> "RandContext":
        devices = [] if self.device_index is None else [self.device_index]
        self._fork = torch.random.fork_rng(devices=devices, device_type=self.device_type)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        if self.device_type is not None:
            torch.get_device_module(self.device_type).set_rng_state(self.device_state, self.device_index)
        return self

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)
        self._fork = None


def grad_cache_step(
    towers: Sequence[tuple[EncodeFn, Sequence[Any]]],
    loss_fn: Callable[[list[Tensor]], Tensor],
) -> Tensor:
    """Backward of loss_fn([tower outputs]) through every encoder, one chunk's graph at a time.

    towers: (encode, chunks) per tower; encode(chunk) returns (rows, ...) and a tower's output
    is its chunks' outputs concatenated along dim 0. loss_fn gets one tensor per tower.
    Accumulates into the parameters' .grad like loss.backward() would; returns the detached loss.
    """
    if not towers or any(len(chunks) == 0 for _, chunks in towers):
        raise GradCacheError("grad_cache_step needs at least one tower and one chunk per tower")

    # 1. Embed without a graph, remembering each chunk's RNG state.
    cached: list[Tensor] = []
    rng_states: list[list[RandContext]] = []
    for encode, chunks in towers:
        states, outputs = [], []
        for chunk in chunks:
            states.append(RandContext())
            with torch.no_grad():
                outputs.append(encode(chunk))
        rng_states.append(states)
        cached.append(torch.cat(outputs).detach().requires_grad_(True))  # (tower rows, ...)

    # 2. Loss on the cached embeddings; gradients stop at them.
    loss = loss_fn(cached)
    loss.backward()

    # 3. Replay each chunk with a graph and push its slice of the cached gradient through.
    for (encode, chunks), states, leaf in zip(towers, rng_states, cached):
        if leaf.grad is None:
            continue  # the loss ignores this tower: its encoder gets no gradient, as in one graph
        offset = 0
        for chunk, state in zip(chunks, states):
            with state:
                output = encode(chunk)
            rows = output.shape[0]
            torch.autograd.backward(output, grad_tensors=leaf.grad[offset : offset + rows])
            offset += rows
        if offset != leaf.shape[0]:
            raise GradCacheError(
                f"a tower's replay produced {offset} rows where its first pass produced {leaf.shape[0]}"
            )
    return loss.detach()
