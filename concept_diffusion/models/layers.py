"""Transformer building blocks: RMSNorm, RoPE, attention, SwiGLU MLP, blocks, stacks.

Params are float32 and carry logical axis names; compute runs in `cfg.dtype`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -1e30  # Finite, so a fully masked row gives a uniform softmax, not NaN.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable model hyper-parameters, built from config.model by `from_config`."""
  vocab_size: int = 256
  embed_dim: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  concept_dim: int = 32
  concept_len: int = 8
  encoder_layers: int = 2
  renderer_layers: int = 2
  concept_layers: int = 2
  diff_head_layers: int = 2
  diff_head_dim: int = 64
  baseline_layers: int = 2
  dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "xla"
  rope_max_wavelength: float = 10_000.0
  prev_concept: bool = False
  context_chunks: int = 0
  encoder_pooling: str = "mean"
  head_reads_context: bool = False
  head_mean: bool = False
  head_skip: bool = False
  self_condition: bool = False

  @classmethod
  def from_config(cls, config, vocab_size: int | None = None) -> "ModelConfig":
    """Reads config.model (+ data.concept_len, render.prev_concept / context_chunks)."""
    m = config.model
    return cls(
        vocab_size=int(vocab_size or config.data.vocab_size),
        embed_dim=m.embed_dim, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim, mlp_dim=m.mlp_dim, concept_dim=m.concept_dim,
        concept_len=config.data.concept_len, encoder_layers=m.encoder_layers,
        renderer_layers=m.renderer_layers, concept_layers=m.concept_layers,
        diff_head_layers=m.diff_head_layers, diff_head_dim=m.diff_head_dim,
        baseline_layers=m.baseline_layers, dtype=m.dtype, scan_layers=bool(m.scan_layers),
        remat=m.remat, attention=m.attention, rope_max_wavelength=float(m.rope_max_wavelength),
        prev_concept=bool(config.render.prev_concept),
        context_chunks=int(config.render.get("context_chunks", 0)),
        # .get: configs saved before the field pooled by the mean.
        encoder_pooling=m.get("encoder_pooling", "mean"),
        head_reads_context=bool(m.get("head_reads_context", False)),
        head_mean=bool(m.get("head_mean", False)),
        head_skip=bool(m.get("head_skip", False)),
        self_condition=bool(m.get("self_condition", False)))

  @property
  def compute_dtype(self):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[self.dtype]


def partitioned(init, names):
  """An initializer whose param carries logical axis names."""
  return nn.with_logical_partitioning(init, names)


DEFAULT_INIT = None  # dense(): truncated-normal fan-in init over the kernel's input axes.


def fan_in_init(num_in: int, num_out: int):
  """Truncated-normal fan-in init for a kernel shaped in_dims + out_dims."""
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=tuple(range(num_in)),
      out_axis=tuple(range(num_in, num_in + num_out)))


class Dense(nn.Module):
  """DenseGeneral whose kernel is created at full rank, so its logical names always fit.

  (flax's DenseGeneral initialises a flat 2-D kernel and reshapes it, and the names of
  a multi-axis kernel cannot be applied to the flat one under a mesh.)
  """
  features: tuple[int, ...]
  names: tuple
  num_in: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  init: Any = DEFAULT_INIT

  @nn.compact
  def __call__(self, x):
    n_in, n_out = self.num_in, len(self.features)
    init = self.init or fan_in_init(n_in, n_out)
    kernel = self.param("kernel", partitioned(init, self.names),
                        (*x.shape[x.ndim - n_in:], *self.features), jnp.float32)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros_init(), self.names[n_in:]),
                        self.features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, names, cfg: ModelConfig, *, axis=-1, use_bias=False, init=DEFAULT_INIT,
          name=None):
  """Dense over the last axis (or the trailing `axis` tuple), fp32 params, named axes."""
  feats = features if isinstance(features, tuple) else (features,)
  num_in = len(axis) if isinstance(axis, tuple) else 1
  if len(names) != num_in + len(feats):
    raise ValueError(f"dense {name}: {len(names)} axis names for a kernel of rank "
                     f"{num_in + len(feats)}")
  return Dense(feats, tuple(names), num_in, use_bias, cfg.compute_dtype, init, name=name)


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale; statistics in float32."""
  dtype: Any = jnp.float32
  axis_name: str = "embed"
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale_E = self.param("scale", partitioned(nn.initializers.ones_init(), (self.axis_name,)),
                         (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale_E).astype(self.dtype)


def layer_norm(x, eps: float = 1e-6):
  """Parameter-free LayerNorm: zero mean, unit variance on the last axis (float32)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rope(x_BxTxHxK, positions_BxT, max_wavelength: float):
  """Rotary position embedding (half-split form), computed in float32."""
  k = x_BxTxHxK.shape[-1]
  freq_K2 = max_wavelength ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  angle_BxTx1xK2 = positions_BxT[:, :, None, None].astype(jnp.float32) * freq_K2
  sin, cos = jnp.sin(angle_BxTx1xK2), jnp.cos(angle_BxTx1xK2)
  x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


def segment_mask(segment_ids_BxT, causal: bool):
  """Attention mask [B, T, T]: same segment (and key <= query when causal).

  Padding (segment 0) attends only to padding, so no row is empty.
  """
  mask_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  if causal:
    t = segment_ids_BxT.shape[1]
    mask_BxTxT &= jnp.tril(jnp.ones((t, t), bool))[None]
  return mask_BxTxT


def segment_positions(segment_ids_BxT):
  """Position of each token inside its segment (restarts at every document)."""
  t = segment_ids_BxT.shape[1]
  idx_BxT = jnp.broadcast_to(jnp.arange(t), segment_ids_BxT.shape)
  prev_BxT = jnp.pad(segment_ids_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts_BxT = jnp.where(segment_ids_BxT != prev_BxT, idx_BxT, 0)
  return idx_BxT - jax.lax.cummax(starts_BxT, axis=1)


def attend_xla(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS):
  """Reference attention with grouped KV heads; softmax in float32."""
  b, t, h, k = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, k)
  logits_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK,
                                preferred_element_type=jnp.float32) / np.sqrt(k)
  logits_BxGxRxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxGxRxTxS, NEG_INF)
  probs_BxGxRxTxS = jax.nn.softmax(logits_BxGxRxTxS, axis=-1).astype(v_BxSxGxK.dtype)
  out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS, v_BxSxGxK)
  return out_BxTxGxRxK.reshape(b, t, h, k)


def attend_cudnn(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS):
  """cuDNN fused attention (GPU only, half precision)."""
  if jax.default_backend() != "gpu":
    raise ValueError(f"model.attention='cudnn' needs a GPU, but the JAX backend is "
                     f"{jax.default_backend()!r}; use model.attention='xla'")
  if q_BxTxHxK.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError("model.attention='cudnn' supports half precision only; "
                     "set model.dtype='bfloat16' or use model.attention='xla'")
  return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK,
                                      mask=mask_BxTxS[:, None], implementation="cudnn")


ATTENTION = {"xla": attend_xla, "cudnn": attend_cudnn}


class Attention(nn.Module):
  """Multi-head attention with RoPE, grouped KV heads and an optional KV cache."""
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxE, mask_BxTxS, positions_BxT):
    cfg = self.cfg
    h, g, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_BxTxHxK = dense((h, k), ("embed", "heads", "kv"), cfg, name="query")(x_BxTxE)
    k_BxSxGxK = dense((g, k), ("embed", "kv_heads", "kv"), cfg, name="key")(x_BxTxE)
    v_BxSxGxK = dense((g, k), ("embed", "kv_heads", "kv"), cfg, name="value")(x_BxTxE)
    if self.decode:
      positions_BxT, mask_BxTxS, k_BxSxGxK, v_BxSxGxK = self._use_cache(k_BxSxGxK, v_BxSxGxK)
    q_BxTxHxK = rope(q_BxTxHxK, positions_BxT, cfg.rope_max_wavelength)
    if not self.decode:
      k_BxSxGxK = rope(k_BxSxGxK, positions_BxT, cfg.rope_max_wavelength)
    q_BxTxHxK = nn.with_logical_constraint(q_BxTxHxK, ("batch", "length", "heads", "kv"))
    out_BxTxHxK = ATTENTION[cfg.attention](q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS)
    return dense(cfg.embed_dim, ("heads", "kv", "embed"), cfg, axis=(-2, -1),
                 name="out")(out_BxTxHxK)

  def _use_cache(self, k_BxTxGxK, v_BxTxGxK):
    """Writes this call's keys/values at the cache index; returns positions, mask, k, v."""
    initialised = self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, k_BxTxGxK.shape, k_BxTxGxK.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, v_BxTxGxK.shape, v_BxTxGxK.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    b, t = k_BxTxGxK.shape[:2]
    positions_BxT = jnp.broadcast_to(index.value + jnp.arange(t), (b, t))
    k_BxTxGxK = rope(k_BxTxGxK, positions_BxT, self.cfg.rope_max_wavelength)
    if not initialised:  # init only sizes the cache; run as a plain causal pass.
      return positions_BxT, jnp.tril(jnp.ones((b, t, t), bool)), k_BxTxGxK, v_BxTxGxK
    start = (0, index.value, 0, 0)
    ck.value = jax.lax.dynamic_update_slice(ck.value, k_BxTxGxK.astype(ck.value.dtype), start)
    cv.value = jax.lax.dynamic_update_slice(cv.value, v_BxTxGxK.astype(cv.value.dtype), start)
    s = ck.value.shape[1]
    mask_BxTxS = jnp.broadcast_to(jnp.arange(s)[None, :] <= positions_BxT[0, :, None], (b, t, s))
    index.value = index.value + t
    return positions_BxT, mask_BxTxS, ck.value, cv.value


class Mlp(nn.Module):
  """SwiGLU feed-forward: silu(x W0) * (x W1) W2."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE):
    cfg = self.cfg
    gate_BxTxF = dense(cfg.mlp_dim, ("embed", "mlp"), cfg, name="gate")(x_BxTxE)
    up_BxTxF = dense(cfg.mlp_dim, ("embed", "mlp"), cfg, name="up")(x_BxTxE)
    h_BxTxF = nn.with_logical_constraint(nn.silu(gate_BxTxF) * up_BxTxF,
                                         ("batch", "length", "mlp"))
    return dense(cfg.embed_dim, ("mlp", "embed"), cfg, name="down")(h_BxTxF)


class Block(nn.Module):
  """Pre-norm transformer block; returns (x, None) so it can be scanned."""
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxE, mask_BxTxS, positions_BxT):
    dtype = self.cfg.compute_dtype
    h_BxTxE = RMSNorm(dtype, name="attn_norm")(x_BxTxE)
    x_BxTxE = x_BxTxE + Attention(self.cfg, self.decode, name="attn")(
        h_BxTxE, mask_BxTxS, positions_BxT)
    h_BxTxE = RMSNorm(dtype, name="mlp_norm")(x_BxTxE)
    x_BxTxE = x_BxTxE + Mlp(self.cfg, name="mlp")(h_BxTxE)
    return nn.with_logical_constraint(x_BxTxE, ("batch", "length", "embed")), None


REMAT_POLICIES = {
    "full": None,  # Save nothing; recompute the whole block in the backward pass.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # Keep matmul outputs.
}


class Transformer(nn.Module):
  """A stack of blocks (looped or nn.scan-ned, optionally rematerialised) + final norm."""
  cfg: ModelConfig
  num_layers: int
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxE, mask_BxTxS, positions_BxT):
    cfg = self.cfg
    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    x_BxTxE = nn.with_logical_constraint(x_BxTxE.astype(cfg.compute_dtype),
                                         ("batch", "length", "embed"))
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                      length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxE, _ = stack(cfg, self.decode, name="layers")(x_BxTxE, mask_BxTxS, positions_BxT)
    else:
      for i in range(self.num_layers):
        x_BxTxE, _ = block(cfg, self.decode, name=f"layer_{i}")(x_BxTxE, mask_BxTxS,
                                                                positions_BxT)
    return RMSNorm(cfg.compute_dtype, name="final_norm")(x_BxTxE)


def embed(cfg: ModelConfig, name="embed"):
  """Token embedding table [V, E] (std 1; the pre-norm blocks fix the scale)."""
  return nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype,
                  param_dtype=jnp.float32,
                  embedding_init=partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
                  name=name)


def unscanned_to_scanned(params, num_layers: int):
  """Stacks layer_0..layer_{n-1} subtrees into one `layers` subtree (any nesting level)."""
  if not isinstance(params, dict):
    return params
  out = {k: unscanned_to_scanned(v, num_layers) for k, v in params.items()
         if not k.startswith("layer_")}
  if "layer_0" in params:
    layers = [params[f"layer_{i}"] for i in range(num_layers)]
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out

