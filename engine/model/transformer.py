"""The decoder backbone: Llama / Qwen2 / Qwen3 / Mistral in one module tree.

Parameter names equal Hugging Face's *ForCausalLM names (model.embed_tokens,
model.layers.N.self_attn.q_proj, ..., model.norm, lm_head), so a safetensors state dict
loads with no renaming and an exported one loads in transformers.

The main path is a packed token stream (engine.data.batch.PackedSequences): input_ids
(T,), position_ids restarting per sequence, cu_seqlens. Padded (B, S) batches with an
attention mask are unpadded into that form and scattered back. forward() returns the
final-normed hidden states; the LM head is applied only where asked (`logits`, or just a
few rows with `lm_head_rows` for a reranker's yes/no score).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine.model.args import ModelArgs
from engine.model.attention import SelfAttention
from engine.model.mlp import MLP
from engine.model.norm import RMSNorm
from engine.model.pooling import pool
from engine.model.rope import RotaryEmbedding


class InputError(ValueError):
    """Inputs to Transformer.forward that do not describe a batch."""


class StreamLayout(NamedTuple):
    """The packed stream as this rank computes on it (Transformer.lay_out); every pipeline stage
    lays out the same one from the batch, so only the hidden states travel between stages."""

    input_ids: Tensor  # (T_local,)
    position_ids: Tensor  # (T_local,)
    cu_seqlens: Tensor  # (n_local + 1,) int32
    max_seqlen: int
    seq_lens: Tensor | None  # whole-sequence lengths under context parallelism, else None
    tokens: int  # T of the stream handed in (before padding or sharding)
    global_cu_seqlens: Tensor  # the cu_seqlens handed in
    context_shard: Any  # ContextParallel's shard of the stream, or None


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = SelfAttention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # Where the normed input enters attention / the MLP: identity in one process; the
        # tensor-parallel region map (copy, or all-gather of a token slice) when parallelized.
        self.attn_entry = nn.Identity()
        self.mlp_entry = nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                seq_lens: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.attn_entry(self.input_layernorm(x)), cos, sin, cu_seqlens, max_seqlen, seq_lens)
        return x + self.mlp(self.mlp_entry(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """What Hugging Face calls `model`: embeddings, layers, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args)
        self.recompute = "none"  # set_recompute(): none | selective | full
        # Sequence parallelism splits the token stream evenly over ranks: the stream is padded
        # to this multiple, and the final hidden states are gathered back by output_gather.
        self.sequence_pad_multiple = 1
        self.output_gather = nn.Identity()
        # Context parallelism (engine.parallel.context.ContextParallel) splits every sequence over
        # ring x ulysses ranks; None in one process.
        self.context_parallel = None
        self.tie_weights()
        # A tied lm_head is the embedding: keep it out of state dicts, as HF checkpoints do.
        self.register_state_dict_post_hook(_drop_tied_lm_head)
        self.register_load_state_dict_pre_hook(_fill_tied_lm_head)
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.tie_weights())
        self.init_weights()

    # ---- weights ---------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the architecture ties them (HF does the same).
        A pipeline stage may hold neither or only one of them (engine/parallel/pipeline/stage.py)."""
        if self.args.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def held_layers(self) -> list[nn.Module]:
        """The decoder layers this rank holds: all of them, or a pipeline stage's."""
        return [layer for layer in self.model.layers if isinstance(layer, DecoderLayer)]

    def holds(self, name: str) -> bool:
        """Whether this rank's part of the model is where the checkpoint tensor `name` belongs (a
        pipeline stage holds some layers, and the embedding, norm and head only at its ends). Names
        of layers the architecture does not have count as held: loading reports them."""
        parts = name.split(".")
        if name.startswith("model.layers.") and len(parts) > 2 and parts[2].isdigit():
            index = int(parts[2])
            return index >= len(self.model.layers) or isinstance(self.model.layers[index], DecoderLayer)
        owner = {"model.embed_tokens.": self.model.embed_tokens, "model.norm.": self.model.norm,
                 "lm_head.": self.lm_head}
        return next((module is not None for start, module in owner.items() if name.startswith(start)), True)

    def _apply(self, fn, recurse=True):
        # .to()/.to_empty() may replace parameters (e.g. meta -> cpu); re-share afterwards.
        result = super()._apply(fn, recurse)
        self.tie_weights()
        return result

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init as HF does it: normal(0, std) matrices, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.args.tie_word_embeddings:
                    continue
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def set_recompute(self, mode: str) -> None:
        """Activation recomputation in backward: none; selective = each block's attention core
        (q, k, v in, output out); full = each whole block (only its input is kept)."""
        if mode not in ("none", "selective", "full"):
            raise ValueError(f"recompute={mode!r} is not one of none, selective, full")
        self.recompute = mode
        for layer in self.held_layers():
            layer.self_attn.recompute_core = mode == "selective"

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        attention_mask: Tensor | None = None,
        pooling: str | None = None,
    ) -> Tensor:
        """Final-normed hidden states.

        packed:  input_ids (T,) + cu_seqlens (n+1,) [+ position_ids (T,)]   -> (T, hidden)
        padded:  input_ids (B, S) + attention_mask (B, S) of 1/0            -> (B, S, hidden), zeros at pads
        full:    input_ids (B, S), no mask, no cu_seqlens: B whole sequences -> (B, S, hidden)
        pooling (packed input only): "last" | "mean" | "cls" -> (n, hidden), one vector per sequence
        (engine.model.pooling); under context parallelism this rank's share, see reduce_shards().
        """
        if pooling is not None and cu_seqlens is None:
            raise InputError("pooling= needs packed input: input_ids (T,) with cu_seqlens")
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise InputError("pass either attention_mask (padded input) or cu_seqlens (packed input), not both")
            return self._forward_padded(input_ids, attention_mask, position_ids)
        if input_ids.dim() == 2 and cu_seqlens is None:
            batch, seq_len = input_ids.shape
            cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=input_ids.device)
            if position_ids is None:
                position_ids = torch.arange(seq_len, device=input_ids.device).repeat(batch)
            hidden = self.forward_packed(input_ids.reshape(-1), position_ids.reshape(-1), cu_seqlens, seq_len)
            return hidden.view(batch, seq_len, -1)
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise InputError(f"packed input must be (T,) or (1, T); got input_ids {tuple(input_ids.shape)}")
        flat_ids = input_ids.reshape(-1)
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, flat_ids.numel()], dtype=torch.int32, device=flat_ids.device)
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        hidden = self.forward_packed(flat_ids, position_ids.reshape(-1), cu_seqlens, max_seqlen, pooling)
        return hidden if pooling is not None else hidden.view(*input_ids.shape, -1)

    def forward_packed(self, input_ids: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                       pooling: str | None = None) -> Tensor:
        """input_ids, position_ids (T,), cu_seqlens (n+1,) int32 -> hidden (T, hidden), or pooled (n, hidden).

        Under context parallelism the rows of tokens another rank holds are zeros: per-sequence
        results computed from them are partial and summed over ranks by reduce_shards(). With
        `pooling` each rank pools its own rows and the (T, hidden) stream is never built.
        The three parts are the pieces a pipeline stage runs: embed on the first stage, a slice
        of the layers on each, finish on the last; every stage lays out the same stream."""
        stream = self.lay_out(input_ids, position_ids, cu_seqlens, max_seqlen)
        x = self.run_layers(self.embed(stream), stream)
        return self.finish(x, stream, pooling)

    def lay_out(self, input_ids: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> StreamLayout:
        """What this rank computes on: its context-parallel shard of the stream, or the stream
        padded to the sequence-parallel multiple. Cheap (index arithmetic), so each stage redoes it."""
        if input_ids.shape != position_ids.shape:
            raise InputError(f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} differ")
        tokens, global_cu_seqlens = input_ids.shape[0], cu_seqlens
        if self.context_parallel is not None:
            shard = self.context_parallel.shard(input_ids, position_ids, cu_seqlens)
            return StreamLayout(shard.input_ids, shard.position_ids, shard.cu_seqlens, shard.max_seqlen,
                               shard.seq_lens, tokens, global_cu_seqlens, shard)
        padded = pad_packed(input_ids, position_ids, cu_seqlens, max_seqlen, self.sequence_pad_multiple)
        return StreamLayout(*padded, None, tokens, global_cu_seqlens, None)

    def hidden_shape(self, stream: StreamLayout) -> tuple[int, int]:
        """The residual stream's (tokens, hidden) between layers on this rank: the laid-out tokens, split
        over the tp ranks under sequence parallelism (the stream is padded to that multiple and the
        embedding reduce-scatters it)."""
        return len(stream.input_ids) // self.sequence_pad_multiple, self.args.hidden_size

    def embed(self, stream: StreamLayout) -> Tensor:
        return self.model.embed_tokens(stream.input_ids)  # (T, hidden), or this rank's slice of T

    def run_layers(self, x: Tensor, stream: StreamLayout, layers: nn.ModuleList | None = None) -> Tensor:
        """x through `layers` (default: all of them; a pipeline stage passes its own)."""
        cos, sin = self.rotary(stream.position_ids, x.dtype)  # (T, head_dim) each
        args = (cos, sin, stream.cu_seqlens, stream.max_seqlen, stream.seq_lens)
        for layer in self.model.layers if layers is None else layers:
            if self.recompute == "full" and torch.is_grad_enabled():
                x = checkpoint(layer, x, *args, use_reentrant=False)
            else:
                x = layer(x, *args)
        return x

    def finish(self, x: Tensor, stream: StreamLayout, pooling: str | None = None) -> Tensor:
        """Final norm, the sequence-parallel gather, and either the token stream or its pooled rows."""
        hidden = self.output_gather(self.model.norm(x))
        if stream.context_shard is not None:
            if pooling is not None:
                return self.context_parallel.pool(hidden, stream.context_shard, stream.global_cu_seqlens, pooling)
            return self.context_parallel.unshard(hidden, stream.context_shard, stream.tokens)
        hidden = hidden[:stream.tokens]
        return hidden if pooling is None else pool(hidden, stream.global_cu_seqlens, pooling)

    def reduce_shards(self, per_sequence: Tensor) -> Tensor:
        """Per-sequence results (pooled vectors, scores) computed from forward()'s hidden states,
        summed over context-parallel ranks; unchanged without context parallelism."""
        if self.context_parallel is None:
            return per_sequence
        return self.context_parallel.reduce(per_sequence)

    def _forward_padded(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None) -> Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise InputError(
                f"padded input needs input_ids and attention_mask of the same (B, S) shape; "
                f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        batch, seq_len = input_ids.shape
        keep = attention_mask.reshape(-1).bool()
        token_index = keep.nonzero().squeeze(1)  # (T,) positions of real tokens in the (B*S) grid
        lengths = attention_mask.bool().sum(1)  # (B,)
        cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=input_ids.device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        if position_ids is None:
            # Left or right padding: a token's position is the number of real tokens before it.
            position_ids = attention_mask.long().cumsum(1) - 1
        packed_positions = position_ids.reshape(-1)[token_index]
        packed_ids = input_ids.reshape(-1)[token_index]
        hidden = self.forward_packed(packed_ids, packed_positions, cu_seqlens, int(lengths.max()))  # (T, hidden)
        grid = hidden.new_zeros(batch * seq_len, hidden.shape[-1]).index_copy(0, token_index, hidden)
        return grid.view(batch, seq_len, -1)

    # ---- LM head -----------------------------------------------------------------------------
    def lm_head_rows(self, token_ids: list[int]) -> Tensor:
        """(k, hidden): the output-projection rows of just these tokens (never the whole vocabulary)."""
        if hasattr(self.lm_head, "rows"):  # vocabulary split over ranks
            return self.lm_head.rows(token_ids)
        index = torch.as_tensor(token_ids, dtype=torch.long, device=self.lm_head.weight.device)
        return self.lm_head.weight.index_select(0, index)

    def logits(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary logits (tests and export checks; training never needs them)."""
        return self.lm_head(hidden)


def positions_from_cu_seqlens(cu_seqlens: Tensor) -> Tensor:
    """(T,) int64 positions restarting at 0 at every sequence start."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(cu_seqlens[-1])
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def pad_packed(
    input_ids: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int, multiple: int
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Append one filler sequence so the stream length is a multiple of `multiple`.

    The filler attends only to itself (its own cu_seqlens entry) and is cut off the output,
    so the real sequences compute exactly what they would unpadded.
    """
    pad = -input_ids.shape[0] % multiple
    if pad == 0:
        return input_ids, position_ids, cu_seqlens, max_seqlen
    input_ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
    position_ids = torch.cat([position_ids, torch.arange(pad, device=position_ids.device, dtype=position_ids.dtype)])
    cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + pad])
    return input_ids, position_ids, cu_seqlens, max(max_seqlen, pad)


def _drop_tied_lm_head(module: Transformer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if module.args.tie_word_embeddings:
        state_dict.pop(prefix + "lm_head.weight", None)


def _fill_tied_lm_head(module: Transformer, state_dict: dict, prefix: str, *args) -> None:
    embed_key, head_key = prefix + "model.embed_tokens.weight", prefix + "lm_head.weight"
    holds_head = module.lm_head is not None
    if module.args.tie_word_embeddings and holds_head and head_key not in state_dict and embed_key in state_dict:
        state_dict[head_key] = state_dict[embed_key]
