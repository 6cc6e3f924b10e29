"""The speed options train like the plain float32 step.

Mixed precision (`--precision=mixed_bfloat16`): same deterministic weights,
same batches, the bfloat16 model's outputs, losses over several steps and
update directions stay within stated tolerances of float32, while variables,
batch-norm statistics, losses and outputs stay float32.
XLA (`--jit_compile`): one step gives float32's losses and updates.
(Speed is measured by bench/train_step.py, not here.)
"""
import sys

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import conftest
import model as model_lib
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
  """Outputs, per-step loss terms and weight updates of a short run."""
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
  return model, outputs, losses, updates


@pytest.fixture(scope='module')
def runs():
  return train('float32'), train('mixed_bfloat16')


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


def test_xla_step_matches_plain_step(runs):
  """Measured: loss terms within 1.6e-6 (relative); each kernel's update
  within 1.3e-2 (relative l2: XLA reorders the sums of the backward pass and
  these gradients are ill-conditioned; a plain rerun differs by 0.0)."""
  (_, _, want, want_updates), _ = runs
  _, _, got, got_updates = train('float32', steps=1, jit_compile=True)
  for key, value in got[0].items():
    assert abs(value - want[0][key]) <= 1e-5 * max(1, abs(want[0][key])), key
  worst = max(rel(got_updates[0][k], want_updates[0][k])
              for k in want_updates[0] if k.endswith('kernel'))
  assert worst < 5e-2, worst


def test_xla_refuses_several_replicas(mirrored2):
  cfg = CFG.replace(jit_compile=True)
  with mirrored2.scope():
    model = model_lib.Model(10, cfg)
  with pytest.raises(ValueError, match='jit_compile=True with 2 replicas'):
    training.make_train_step(model, None, cfg, mirrored2)
