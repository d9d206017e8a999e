"""AdamW with warmup + cosine/constant schedule, decay mask, clipping, frozen subtrees."""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
import optax

# Leaves whose path contains one of these are not decayed (norm scales, biases, embeddings).
_NO_DECAY = ("norm", "scale", "bias", "embed", "pos_emb", "slot")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to train.learning_rate, then cosine to min_lr_ratio or constant."""
  t = config.train
  warmup = optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
  if t.schedule == "constant":
    after = optax.constant_schedule(t.learning_rate)
  else:
    decay_steps = max(t.num_steps - t.warmup_steps, 1)
    after = optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=t.min_lr_ratio)
  return optax.join_schedules([warmup, after], [t.warmup_steps])


def _path_names(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()


def decay_mask(params):
  """True on matrices that get weight decay; False on norms, biases, embeddings, vectors."""
  def one(path, leaf):
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    name = _path_names(path)
    return value.ndim >= 2 and not any(word in name for word in _NO_DECAY)
  return jax.tree_util.tree_map_with_path(
      one, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _frozen_labels(params, frozen: tuple[str, ...]):
  """'frozen' for top-level subtrees listed in `frozen`, else 'train'."""
  return {k: jax.tree.map(lambda _: "frozen" if k in frozen else "train", v,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
          for k, v in params.items()}


def make_optimizer(config: ml_collections.ConfigDict,
                   frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """The training optimizer; top-level param subtrees in `frozen` never change."""
  t = config.train
  chain = []
  if t.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(t.grad_clip))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.95, eps=1e-8,
                           weight_decay=t.weight_decay, mask=decay_mask))
  tx = optax.chain(*chain)
  if not frozen:
    return tx
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               lambda p: _frozen_labels(p, frozen))
