"""The speed options train like the plain float32 step.

Mixed precision (`--precision=mixed_bfloat16` / `mixed_float16`): same
deterministic weights, same batches, the low-precision model's outputs,
losses over several steps and update directions stay within stated
tolerances of float32, while variables, batch-norm statistics, losses and
outputs stay float32; float16's loss scaling is undone before the update and
a step with overflowing gradients is skipped.
XLA (`--jit_compile`): one step gives float32's losses and updates.
(Speed is measured by bench/train_step.py, not here.)
"""
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import checkpoints
import conftest
import model as model_lib
import resnet
import training
from config import Config

CFG = Config(resnet_depth=18, image_size=32, train_batch_size=32,
             learning_rate=1.0, temperature=0.5, weight_decay=1e-4,
             warmup_epochs=0, use_blur=False, lineareval_while_pretraining=True)
STEPS = 4
# Measured on CPU (TF 2.21): outputs within 6.8e-3 (relative l2), loss terms
# within 8.6e-3 (relative) at every step; bfloat16 keeps 8 bits of mantissa
# (rounding 4e-3). The 4-step update of each encoder kernel is noisier:
# cosine to the float32 update min 0.76, median 0.82 (head kernels' updates
# within 4e-2 relative), so directions are checked, not values.
OUTPUT_TOL, LOSS_TOL = 2e-2, 2e-2
MIN_COSINE, MEDIAN_COSINE = 0.6, 0.75


def det_weights():
  path = str(conftest.require(conftest.FIXTURES_DET))
  if path not in sys.path:
    sys.path.insert(0, path)
  import det_weights as module  # pylint: disable=import-outside-toplevel
  return module


def train(precision, steps=STEPS, **options):
  """(model, outputs, per-step loss terms, per-step weight updates, step,
  optimizer) of a short run."""
  cfg = CFG.replace(precision=precision, **options)
  with model_lib.precision_policy(precision):
    model = model_lib.Model(10, cfg)
    model(tf.zeros([1, 32, 32, 3]), training=False)
  optimizer = model_lib.build_optimizer(
      model_lib.WarmUpAndCosineDecay(cfg.learning_rate, 1000, cfg), cfg)
  by_key = checkpoints.variables_by_key(tf.train.Checkpoint(model=model))
  det_weights().assign_all(by_key)
  initial = {k: v.numpy() for k, v in by_key.items()}
  images = tf.random.stateless_uniform([8, 32, 32, 3], [0, 1])
  outputs = model.endpoints(images, training=False)
  step = tf.function(training.make_train_step(model, optimizer, cfg))
  losses, updates = [], []
  for i in range(steps):
    views = tf.random.stateless_uniform([32, 32, 32, 6], [1, i])
    labels = tf.one_hot(tf.range(32) % 10, 10)
    losses.append({k: float(v) for k, v in step(views, labels).items()})
    updates.append({k: v.numpy() - initial[k] for k, v in by_key.items()})
  return model, outputs, losses, updates, step, optimizer


@pytest.fixture(scope='module')
def runs():
  return train('float32')[:4], train('mixed_bfloat16')[:4]


@pytest.fixture(scope='module')
def float16_run():
  # Two steps: float16 convolutions run on Eigen's slow path on CPUs.
  return train('mixed_float16', steps=2)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def cosine(a, b):
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bfloat16_computes_but_keeps_float32_state(runs):
  (_, _, _, _), (model, outputs, losses, _) = runs
  assert model.resnet_model.compute_dtype == 'bfloat16'
  assert {v.dtype for v in model.variables} == {tf.float32}
  assert {v.dtype for v in outputs.values()} == {tf.float32}
  assert all(np.isfinite(list(step.values())).all() for step in losses)


def test_bfloat16_outputs_close_to_float32(runs):
  (_, want, _, _), (_, got, _, _) = runs
  for key in ('final_avg_pool', 'proj_head_output', 'logits_sup'):
    assert rel(got[key], want[key]) < OUTPUT_TOL, key


def test_bfloat16_losses_and_updates_track_float32(runs):
  (_, _, want, want_updates), (_, _, got, got_updates) = runs
  want_updates, got_updates = want_updates[-1], got_updates[-1]
  for step_want, step_got in zip(want, got):
    for key in ('contrast_loss', 'supervised_loss', 'total_loss'):
      assert abs(step_got[key] - step_want[key]) <= LOSS_TOL * abs(
          step_want[key]), (key, step_got[key], step_want[key])
  # Each kernel's total update over the steps (not its value, which barely
  # moves) points the same way.
  kernels = [k for k in want_updates if k.endswith('kernel')]
  assert all(np.abs(want_updates[k]).max() > 0 for k in kernels)
  cosines = sorted(cosine(got_updates[k], want_updates[k]) for k in kernels)
  assert cosines[0] > MIN_COSINE, cosines[:3]
  assert cosines[len(cosines) // 2] > MEDIAN_COSINE, cosines


def test_float16_computes_but_keeps_float32_state(float16_run):
  model, outputs, losses, _, _, _ = float16_run
  assert model.resnet_model.compute_dtype == 'float16'
  assert {v.dtype for v in model.variables} == {tf.float32}
  assert {v.dtype for v in outputs.values()} == {tf.float32}
  assert all(np.isfinite(list(step.values())).all() for step in losses)


def test_float16_tracks_float32_and_unscales_its_gradients(runs,
                                                           float16_run):
  """float16 keeps 11 bits of mantissa (bfloat16 8), so the bfloat16
  tolerances hold. Batch-norm and bias parameters get plain momentum
  updates under LARS (no trust ratio), so their update size shows the
  gradients were divided by the loss scale (2**15) again."""
  (_, want, want_losses, want_updates), _ = runs
  _, got, got_losses, got_updates, _, _ = float16_run
  for key in ('final_avg_pool', 'proj_head_output', 'logits_sup'):
    assert rel(got[key], want[key]) < OUTPUT_TOL, key
  for step_want, step_got in zip(want_losses, got_losses):
    for key in ('contrast_loss', 'supervised_loss', 'total_loss'):
      assert abs(step_got[key] - step_want[key]) <= LOSS_TOL * abs(
          step_want[key]), (key, step_got[key], step_want[key])
  want_updates, got_updates = want_updates[1], got_updates[1]
  kernels = [k for k in want_updates if k.endswith('kernel')]
  cosines = sorted(cosine(got_updates[k], want_updates[k]) for k in kernels)
  assert cosines[0] > MIN_COSINE, cosines[:3]
  plain = [k for k in want_updates if k.endswith(('gamma', 'beta', 'bias'))
           and np.abs(want_updates[k]).max() > 0]
  ratios = [np.linalg.norm(got_updates[k]) / np.linalg.norm(want_updates[k])
            for k in plain]
  assert len(plain) > 20 and 0.5 < np.median(ratios) < 2, np.median(ratios)


def test_float16_skips_a_step_whose_scaled_gradients_overflow(float16_run):
  """A loss scale of 2**40 overflows float16 gradients (max 65504): the step
  is skipped (counted, as in Keras) and the scale halves."""
  model, _, _, _, _, _ = float16_run
  cfg = CFG.replace(precision='mixed_float16')
  optimizer = keras.mixed_precision.LossScaleOptimizer(
      model_lib.build_optimizer(
          model_lib.WarmUpAndCosineDecay(cfg.learning_rate, 1000, cfg), cfg),
      initial_scale=2.**40)
  step = tf.function(training.make_train_step(model, optimizer, cfg))
  before = [v.numpy() for v in model.trainable_variables]
  views = tf.random.stateless_uniform([32, 32, 32, 6], [5, 6])
  terms = step(views, tf.one_hot(tf.range(32) % 10, 10))
  assert np.isfinite(float(terms['total_loss']))  # the forward pass is fine
  assert int(optimizer.iterations) == 1
  assert float(optimizer.loss_scale) == 2.**39
  for old, variable in zip(before, model.trainable_variables):
    np.testing.assert_array_equal(old, variable.numpy(), variable.name)


def test_fused_batch_norm_matches_the_unfused_layer(runs):
  """`--fused_batch_norm` in float32, one step from the same weights.
  Measured: outputs within 7.4e-7, losses 3.4e-7, moving statistics' updates
  2.1e-5 (keeping the fused kernel's Bessel-corrected variance would be off
  by 1/n, 1e-3 in block group 4 here), kernel updates 1.1e-2 (relative l2;
  these gradients are ill-conditioned, as in the XLA test)."""
  (_, want, want_losses, want_updates), _ = runs
  _, got, got_losses, got_updates, _, _ = train('float32', steps=1,
                                                fused_batch_norm=True)
  for key in ('final_avg_pool', 'proj_head_output', 'logits_sup'):
    assert rel(got[key], want[key]) < 1e-5, key
  for key, value in got_losses[0].items():
    assert abs(value - want_losses[0][key]) <= 1e-5 * max(
        1, abs(want_losses[0][key])), key
  moving = [k for k in want_updates[0] if '/moving_' in k]
  assert len(moving) == 48
  worst = max(rel(got_updates[0][k], want_updates[0][k]) for k in moving)
  assert worst < 1e-4, worst
  worst = max(rel(got_updates[0][k], want_updates[0][k])
              for k in want_updates[0] if k.endswith('kernel'))
  assert worst < 5e-2, worst


def test_fused_batch_norm_synchronises_over_replicas(mirrored2):
  """With two replicas a cross-replica layer keeps the all-reduce path: the
  same outputs and moving statistics as the unfused layer, bit for bit."""
  images = tf.random.stateless_normal([2, 4, 4, 4, 8], [3, 4])
  results = []
  for fused in (False, True):
    with mirrored2.scope():
      layer = resnet.BatchNormRelu(global_bn=True, fused=fused)
      layer.build([2, 4, 4, 8])
    outputs = mirrored2.run(
        tf.function(lambda x: layer(x, training=True)),
        (mirrored2.experimental_distribute_values_from_function(
            lambda context: images[context.replica_id_in_sync_group]),))
    results.append([*(o.numpy() for o in mirrored2.experimental_local_results(
        outputs)), layer.bn.moving_mean.numpy(),
                    layer.bn.moving_variance.numpy()])
  assert layer.bn.fused_local
  for unfused, fused in zip(*results):
    np.testing.assert_array_equal(unfused, fused)


def test_fused_batch_norm_freezes_like_the_unfused_layer():
  """Frozen layers: built with trainable=False (the frozen stem and groups,
  as in the original: batch statistics, moving averages updated), and
  frozen afterwards (the setter reaches the batch norm, which Keras then
  runs in inference mode). The fused path does what the unfused one does."""
  images = tf.random.stateless_normal([4, 4, 4, 8], [7, 8]) * 3 + 1
  for freeze_after in (False, True):
    results = []
    for fused in (False, True):
      layer = resnet.BatchNormRelu(global_bn=True, fused=fused,
                                   trainable=False)
      layer.build(images.shape)
      if freeze_after:
        layer.trainable = False
      outputs = layer(images, training=True).numpy()
      results.append((outputs, layer.bn.moving_mean.numpy(),
                      layer.bn.moving_variance.numpy()))
    moved = np.abs(results[0][1]).max() > 0
    assert moved != freeze_after
    for unfused, fused in zip(*results):
      np.testing.assert_allclose(fused, unfused, rtol=1e-5, atol=1e-5)


def test_xla_step_matches_plain_step(runs):
  """Measured: loss terms within 1.6e-6 (relative); each kernel's update
  within 1.3e-2 (relative l2: XLA reorders the sums of the backward pass and
  these gradients are ill-conditioned; a plain rerun differs by 0.0)."""
  (_, _, want, want_updates), _ = runs
  _, _, got, got_updates, _, _ = train('float32', steps=1, jit_compile=True)
  for key, value in got[0].items():
    assert abs(value - want[0][key]) <= 1e-5 * max(1, abs(want[0][key])), key
  worst = max(rel(got_updates[0][k], want_updates[0][k])
              for k in want_updates[0] if k.endswith('kernel'))
  assert worst < 5e-2, worst


def test_xla_refuses_several_replicas(mirrored2):
  import runtime  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match='--jit_compile with 2 replicas'):
    runtime.check_strategy(CFG.replace(jit_compile=True), mirrored2)
  runtime.check_strategy(CFG.replace(jit_compile=True),
                         tf.distribute.get_strategy())
