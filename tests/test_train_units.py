"""Trainer pieces in-process: config checks, optimizer, gradient accumulation, keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.config import ConfigError
from concept_diffusion.train import optimizer, stages, trainer
from concept_diffusion.train import state as state_lib

from conftest import tiny_config


def _config(**train):
  c = config_lib.base_config()
  for k, v in train.items():
    c.train[k] = v
  return c


def test_batch_not_divisible_by_data_parallel_size_names_the_field():
  c = _config(batch_size=12)
  c.mesh.data, c.mesh.fsdp = 2, 4
  with pytest.raises(ConfigError, match="train.batch_size=12"):
    trainer.check_config(c, 8)


def test_mesh_not_dividing_devices_is_a_config_error():
  c = _config()
  c.mesh.tensor = 3
  with pytest.raises(ConfigError, match="mesh.tensor=3"):
    trainer.check_config(c, 8)


def test_zero_generation_candidates_is_a_config_error():
  c = _config()
  c.concepts.num_candidates = 0
  with pytest.raises(ConfigError, match="concepts.num_candidates=0"):
    config_lib.validate(c)


def test_nonpositive_time_shift_is_a_config_error():
  c = _config()
  c.concepts.time_shift = 0.0
  with pytest.raises(ConfigError, match="concepts.time_shift=0.0"):
    config_lib.validate(c)


def test_concepts_without_render_checkpoint_names_the_field(tmp_path):
  c = config_lib.base_config()
  c.stage = "concepts"
  c.concepts.render_workdir = str(tmp_path)
  with pytest.raises(ConfigError, match="concepts.render_workdir"):
    stages.resolve_config(c)
  c.concepts.render_workdir = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="concepts.render_workdir"):
    stages.resolve_config(c)


def test_decay_mask_skips_norms_biases_embeddings():
  params = {"embed": {"embedding": jnp.ones((4, 3))}, "attn_norm": {"scale": jnp.ones(3)},
            "up": {"kernel": jnp.ones((3, 5)), "bias": jnp.ones(5)}}
  mask = optimizer.decay_mask(params)
  assert mask == {"embed": {"embedding": False}, "attn_norm": {"scale": False},
                  "up": {"kernel": True, "bias": False}}


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_warms_up_then_decays(schedule):
  c = _config(learning_rate=1.0, warmup_steps=10, num_steps=110, schedule=schedule,
              min_lr_ratio=0.1)
  lr = optimizer.learning_rate_schedule(c)
  assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1.0) < 1e-6
  assert abs(float(lr(110)) - (0.1 if schedule == "cosine" else 1.0)) < 1e-5


def test_frozen_subtree_never_changes():
  c = _config(learning_rate=0.1, warmup_steps=0, weight_decay=0.1)
  tx = optimizer.make_optimizer(c, frozen=("enc",))
  params = {"enc": {"kernel": jnp.ones((2, 2))}, "model": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["enc"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(updates["model"]["kernel"]).max()) > 0.0


class _Linear:
  """A stand-in stage: linear regression with logical names."""
  frozen = ()
  warm_start = None
  eval_loss_fn = None

  @classmethod
  def held_out_loss_fn(cls):
    return cls.loss_fn

  @staticmethod
  def init_params(key):
    import flax.linen as nn
    w = nn.Partitioned(jax.random.normal(key, (4, 2)), ("embed", "mlp"))
    return {"model": {"kernel": w}}

  @staticmethod
  def loss_fn(params, batch, key):
    noise = 0.0 if key is None else 0.01 * jax.random.normal(key, batch["y"].shape)
    err = batch["x"] @ params["model"]["kernel"] - batch["y"] + noise
    return jnp.mean(err ** 2), {"err": jnp.mean(jnp.abs(err))}


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_matches_one_big_batch(accum):
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
  results = []
  for a in (1, accum):
    c = _config(grad_accum_steps=a, batch_size=8, warmup_steps=0, learning_rate=0.1)
    tx = optimizer.make_optimizer(c)
    st = state_lib.init_state(_Linear.init_params, tx, False, mesh, jax.random.key(0))
    # Noise-free, so accumulation is the only difference.
    stage = type("S", (), {"loss_fn": staticmethod(
        lambda p, b, k: _Linear.loss_fn(p, b, None))})
    step = jax.jit(trainer.make_train_step(c, stage, tx))
    st, m = step(st, batch)
    results.append((float(m["loss"]), np.asarray(st.params["model"]["kernel"])))
  assert abs(results[0][0] - results[1][0]) < 1e-5
  np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-5)


def test_warm_started_subtrees_are_given_not_initialised():
  import flax.linen as nn
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def init_params(key):
    k_enc, k_head = jax.random.split(key)
    normal = lambda k, shape: nn.Partitioned(jax.random.normal(k, shape), ("embed", "mlp"))
    return {"encoder": {f"w{i}": normal(jax.random.fold_in(k_enc, i), (8, 4)) for i in range(8)},
            "head": {"w": normal(k_head, (4, 2))}}

  tx = optimizer.make_optimizer(_config(), frozen=("encoder",))
  key = jax.random.key(0)
  given = {"encoder": {f"w{i}": jnp.full((8, 4), float(i)) for i in range(8)}}
  plain = state_lib.init_state(init_params, tx, True, mesh, key)
  warm = state_lib.init_state(init_params, tx, True, mesh, key, given=given)
  for i in range(8):
    for tree in (warm.params, warm.ema_params):
      np.testing.assert_array_equal(tree["encoder"][f"w{i}"], given["encoder"][f"w{i}"])
  # The train step donates params and EMA: no buffer may be in both.
  assert (warm.params["encoder"]["w0"].unsafe_buffer_pointer()
          != warm.ema_params["encoder"]["w0"].unsafe_buffer_pointer())
  # The rest initialises as without a warm start, bit for bit.
  np.testing.assert_array_equal(warm.params["head"]["w"], plain.params["head"]["w"])
  # And the given subtrees' random init is not in the program: 1 of 9 random draws left.
  program = state_lib.init_program(init_params, tx, True, mesh, key)
  rngs = lambda g: program.lower(key, g).compile().as_text().count("xor(")
  assert rngs(given) * 4 < rngs({}), (rngs(given), rngs({}))


def test_step_key_depends_only_on_seed_and_step():
  k1 = jax.random.key_data(trainer.step_key(3, jnp.int32(7)))
  k2 = jax.random.key_data(trainer.step_key(3, jnp.int32(7)))
  k3 = jax.random.key_data(trainer.step_key(3, jnp.int32(8)))
  assert (np.asarray(k1) == np.asarray(k2)).all() and not (np.asarray(k1) == np.asarray(k3)).all()


def test_ema_trains_and_restores_as_the_decayed_average(tmp_path, tiny_render_run):
  """train.ema_decay > 0: the step (it donates params and EMA) runs; restore returns the EMA.

  A concepts run: its concept model starts from init and its frozen encoder from the
  render run, the two ways a leaf reaches the EMA.
  """
  # Two steps from init p0, the first at warmup's learning rate 0 (so p1 = p0):
  # e2 - p2 = decay * (p0 - p2).
  decay, workdir = 0.5, str(tmp_path / "ema")
  config = tiny_config("concepts", **{
      "concepts.render_workdir": tiny_render_run, "train.num_steps": 2,
      "train.ema_decay": decay, "checkpoint.every_steps": 2})
  trainer.train(config, workdir)
  ema, params = (trainer.restore_params(workdir, use_ema=e)[2] for e in (True, False))
  stage = stages.build_stage(stages.resolve_config(config), trainer.restore_params(workdir)[1],
                             for_training=False)
  init_key = jax.random.fold_in(jax.random.key(config.train.seed), trainer.INIT_STREAM)
  p0 = state_lib.unbox(stage.init_params(init_key))["concept_model"]
  for e2, p2, init in zip(*map(jax.tree.leaves, (ema["concept_model"],
                                                 params["concept_model"], p0))):
    np.testing.assert_allclose(e2 - p2, decay * (init - p2), rtol=1e-3, atol=1e-6)
  lag = lambda name: sum(float(jnp.abs(e - p).sum()) for e, p in zip(  # noqa: E731
      jax.tree.leaves(ema[name]), jax.tree.leaves(params[name])))
  assert lag("concept_model") > 0  # Restore gave the EMA, not the params twice.
  assert lag("encoder") == 0  # Frozen: its EMA is the render run's weights.
