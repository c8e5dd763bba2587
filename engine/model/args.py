"""ModelArgs: the architecture of a decoder backbone, and its mapping to and from config.json.

One dataclass covers the four supported families; they differ only in a few switches:

    family    q/k/v bias        o_proj bias       q/k RMSNorm   notes
    llama     attention_bias    attention_bias    no            mlp_bias allowed, rope 'llama3'
    qwen2     always            never             no
    qwen3     attention_bias    attention_bias    yes           head_dim may differ from hidden/heads
    mistral   never             never             no            sliding window ignored (warned)

`from_hf_config` reads a Hugging Face config.json (either the transformers-4 layout with
`rope_theta`/`rope_scaling` or the transformers-5 `rope_parameters`); `to_hf_config`
writes one that both generations of transformers load as the right *ForCausalLM class.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# transformers' class defaults for keys a config.json may leave out
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768, "mistral": 4096 * 32}
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_SLIDING_WINDOW = 4096
_DEFAULT_MAX_WINDOW_LAYERS = 28
_ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# config.json keys carried through unchanged so an exported model keeps its special tokens
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class ModelArgsError(ValueError):
    """An architecture this engine cannot build or a config.json it cannot read."""


@dataclass(kw_only=True)
class ModelArgs:
    family: str  # llama | qwen2 | qwen3 | mistral
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None = num_heads (no grouped-query attention)
    head_dim: int | None = None  # None = hidden_size // num_heads
    rope_theta: float = _DEFAULT_ROPE_THETA
    rope_scaling: dict[str, Any] | None = None  # HF dict with rope_type 'linear' or 'llama3'; None = plain RoPE
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # q/k/v bias; None = the family's default (True for qwen2)
    o_proj_bias: bool | None = None  # None = the family's rule (see the module docstring)
    mlp_bias: bool = False  # llama only
    qk_norm: bool | None = None  # per-head RMSNorm on q and k before RoPE; None = family == qwen3
    causal: bool = True  # False = bidirectional attention
    token_ids: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids from config.json

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelArgsError(f"model family {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        self.head_dim = self.head_dim or (self.hidden_size // self.num_heads if self.num_heads else 0)
        if self.attention_bias is None:
            self.attention_bias = self.family == "qwen2"
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias if self.family in ("llama", "qwen3") else False
        if self.qk_norm is None:
            self.qk_norm = self.family == "qwen3"
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") == "default":
            self.rope_scaling = None
        self._validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Exact parameter count of Transformer(self), computed without building it."""
        h, qs, kvs = self.hidden_size, self.q_size, self.kv_size
        attention = h * qs + 2 * h * kvs + qs * h
        attention += (qs + 2 * kvs) * self.attention_bias + h * self.o_proj_bias
        attention += 2 * self.head_dim * self.qk_norm
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        per_layer = attention + mlp + 2 * h  # + input and post-attention norms
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * per_layer + h  # + final norm

    # ---- Hugging Face config.json --------------------------------------------------------
    @classmethod
    def from_hf_config(cls, d: dict[str, Any], causal: bool = True) -> "ModelArgs":
        """Map a LlamaForCausalLM / Qwen2 / Qwen3 / Mistral config.json dict."""
        family = d.get("model_type")
        if family not in FAMILIES:
            raise ModelArgsError(
                f"config.json model_type={family!r} is not supported; supported model types: {', '.join(FAMILIES)}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if d.get(k) is None]
        if missing:
            raise ModelArgsError(f"config.json ({family}) lacks {', '.join(missing)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelArgsError(f"config.json hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        max_positions = d.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[family]
        rope_theta, rope_scaling = _read_rope(d, max_positions)
        attention_bias = {"qwen2": True, "mistral": False}.get(family, bool(d.get("attention_bias", False)))
        _warn_if_sliding_window(d, family, max_positions)
        head_dim = d.get("head_dim") or (128 if family == "qwen3" else None)
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads"),
            head_dim=head_dim,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=attention_bias if family in ("llama", "qwen3") else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            causal=causal,
            token_ids={k: d[k] for k in _TOKEN_ID_KEYS if d.get(k) is not None},
        )

    def to_hf_config(self, dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
        """A config.json dict that transformers 4 and 5 load as this family's *ForCausalLM."""
        dtype_name = str(dtype).removeprefix("torch.")
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        config: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            # transformers 4 (and vLLM) read rope_theta/rope_scaling, transformers 5 reads
            # rope_parameters (and still accepts the other two): write both, consistently.
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
            **self.token_ids,
        }
        if self.family in ("llama", "qwen3"):
            config["attention_bias"] = self.attention_bias
        if self.family == "llama":
            config["mlp_bias"] = self.mlp_bias
        if self.family in ("qwen2", "qwen3"):
            config["use_sliding_window"] = False
            config["sliding_window"] = None
            config["max_window_layers"] = self.num_layers
        if self.family == "mistral":
            config["sliding_window"] = None  # we always attend to the full context
        if not self.causal:
            # transformers 5 honours config.is_causal=False in its mask creation (bidirectional).
            config["is_causal"] = False
        return config

    @classmethod
    def from_model_config(cls, m: Any) -> "ModelArgs":
        """Random-init architecture from engine.config.ModelConfig; the family decides bias and q/k norm."""
        return cls(
            family=m.family,
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim or None,
            rope_theta=m.rope_theta,
            rope_scaling=dict(m.rope_scaling) if m.rope_scaling else None,
            rms_norm_eps=m.rms_norm_eps,
            max_position_embeddings=m.max_position_embeddings,
            tie_word_embeddings=m.tie_word_embeddings,
            causal=m.causal,
        )

    # ---- checks ----------------------------------------------------------------------------
    def _validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ModelArgsError(f"model {key}={getattr(self, key)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ModelArgsError(
                f"model num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelArgsError(f"model head_dim={self.head_dim} must be even (RoPE rotates pairs of dimensions)")
        _check_rope_scaling(self.rope_scaling)
        rules = {
            "qwen2": (self.attention_bias and not self.o_proj_bias, "qwen2 has q/k/v bias and no o_proj bias"),
            "mistral": (not (self.attention_bias or self.o_proj_bias), "mistral has no attention bias"),
            "llama": (self.attention_bias == self.o_proj_bias, "llama's attention_bias covers q/k/v and o_proj"),
            "qwen3": (self.attention_bias == self.o_proj_bias, "qwen3's attention_bias covers q/k/v and o_proj"),
        }
        ok, rule = rules[self.family]
        if not ok:
            raise ModelArgsError(
                f"attention_bias={self.attention_bias}, o_proj_bias={self.o_proj_bias} "
                f"cannot be saved as {self.family}: {rule}"
            )
        if self.qk_norm != (self.family == "qwen3"):
            raise ModelArgsError(f"qk_norm={self.qk_norm} is only (and always) part of qwen3, not {self.family}")
        if self.mlp_bias and self.family != "llama":
            raise ModelArgsError(f"mlp_bias=True is only supported for llama, not {self.family}")


def _read_rope(d: dict[str, Any], max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from either config.json layout, as transformers reads it."""
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ModelArgsError("config.json has per-layer-type rope_parameters, which these families do not use")
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or _DEFAULT_ROPE_THETA
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelArgsError(f"config.json partial_rotary_factor={partial} is not supported (only 1.0)")
    if rope_type == "default":
        return float(theta), None
    scaling = {"rope_type": rope_type, **params}
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_positions)
    _check_rope_scaling(scaling)
    return float(theta), scaling


def _check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    if scaling is None:
        return
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelArgsError(f"rope_type={rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    missing = [k for k in _ROPE_REQUIRED_KEYS[rope_type] if k not in scaling]
    if missing:
        raise ModelArgsError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")


def _warn_if_sliding_window(d: dict[str, Any], family: str, max_positions: int) -> None:
    if family == "mistral":
        window = d.get("sliding_window", _DEFAULT_SLIDING_WINDOW)
        active = window is not None
    elif family in ("qwen2", "qwen3"):
        window = d.get("sliding_window", _DEFAULT_SLIDING_WINDOW)
        layer_types = d.get("layer_types") or []
        active = window is not None and (
            "sliding_attention" in layer_types
            or (bool(d.get("use_sliding_window", False))
                and d.get("num_hidden_layers", 0) > d.get("max_window_layers", _DEFAULT_MAX_WINDOW_LAYERS))
        )
    else:
        return
    if active and window < max_positions:
        logger.warning(
            "%s config.json sets sliding_window=%s < max_position_embeddings=%s: Ember uses full attention "
            "(identical for sequences up to %s tokens)", family, window, max_positions, window,
        )
