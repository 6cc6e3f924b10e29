"""Tests of the gradient-cached NT-Xent (grad_cache.py).

Reference: one tape over the whole batch, the model applied chunk by chunk
(so batch norm uses each chunk's statistics, as the cache does), with the
loss of training.compute_losses; autodiff gives its gradient directly.
"""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from config import Config, ConfigError
import grad_cache
from helpers import assert_close
import model as model_lib
import objective
import runtime
import training

BATCH = 8  # per replica
CLASSES = 5


def _config(**changes):
  return Config(resnet_depth=18, width_multiplier=0.125, image_size=16,
                use_blur=False, temperature=0.5, weight_decay=1e-3,
                train_batch_size=BATCH, **changes).validate()


def _model(cfg, strategy):
  keras.utils.set_random_seed(0)
  return runtime.build_model(cfg, CLASSES, strategy)


def _batch(replica, seed=0):
  rng = np.random.RandomState(seed + replica)
  images = rng.uniform(0, 1, (BATCH, 16, 16, 6)).astype(np.float32)
  labels = np.eye(CLASSES, dtype=np.float32)[rng.randint(0, CLASSES, BATCH)]
  return tf.constant(images), tf.constant(labels)


def reference_gradients(model, features, labels, cfg, chunks, strategy):
  replicas = strategy.num_replicas_in_sync
  with tf.GradientTape() as tape:
    outputs = [model(c, training=True) for c in tf.split(features, chunks)]
    halves = [tf.split(proj, 2) for proj, _ in outputs]
    hidden = tf.concat([h[0] for h in halves] + [h[1] for h in halves], 0)
    con_loss, _, _ = objective.add_contrastive_loss(
        hidden, temperature=cfg.temperature, strategy=strategy)
    sup_labels = tf.concat([tf.concat([c, c], 0)
                            for c in tf.split(labels, chunks)], 0)
    sup_loss = objective.add_supervised_loss(
        sup_labels, tf.concat([logits for _, logits in outputs], 0))
    total = con_loss + sup_loss + model_lib.add_weight_decay(model, cfg)
    loss = total / replicas
  terms = {'contrast_loss': con_loss, 'supervised_loss': sup_loss,
           'total_loss': total}
  return terms, tape.gradient(loss, model.trainable_variables)


def _run_both(strategy, chunks, cfg):
  model = _model(cfg, strategy)
  statistics = grad_cache._moving_statistics(model)  # pylint: disable=protected-access
  start = [v.numpy() for v in model.variables]

  def per_replica(context):
    return _batch(context.replica_id_in_sync_group)

  inputs = strategy.experimental_distribute_values_from_function(per_replica)

  def run(fn):  # eagerly: tracing both functions would take longer
    return strategy.run(lambda batch: fn(*batch), args=(inputs,))

  results = {}
  for name, fn in (
      ('reference', lambda x, y: reference_gradients(model, x, y, cfg, chunks,
                                                     strategy)),
      ('cached', lambda x, y: grad_cache.cached_gradients(
          model, x, y, cfg, chunks, strategy))):
    for variable, value in zip(model.variables, start):
      variable.assign(value)
    terms, grads = run(fn)
    replicas = range(strategy.num_replicas_in_sync)

    def local(value, i):
      return strategy.experimental_local_results(value)[i].numpy()

    results[name] = (
        [{k: float(local(v, i)) for k, v in terms.items()} for i in replicas],
        [[local(g, i) for i in replicas] for g in grads],
        [v.numpy() for v in statistics])
  return model, results


@pytest.mark.parametrize('chunks', [2, 4])
def test_cached_gradients_equal_the_chunked_reference_one_replica(chunks):
  cfg = _config()
  model, results = _run_both(tf.distribute.get_strategy(), chunks, cfg)
  _compare(model, results)


def test_cached_gradients_equal_the_chunked_reference_two_replicas(mirrored2):
  cfg = _config()
  model, results = _run_both(mirrored2, 2, cfg)
  _compare(model, results)


def _compare(model, results):
  ref_terms, ref_grads, ref_stats = results['reference']
  terms, grads, stats = results['cached']
  for ours, theirs in zip(terms, ref_terms):
    for name, value in theirs.items():
      assert ours[name] == pytest.approx(value, rel=1e-5), name
  assert len(grads) == len(model.trainable_variables)
  for ours, theirs in zip(grads, ref_grads):
    for replica_ours, replica_theirs in zip(ours, theirs):
      assert_close(replica_ours, replica_theirs, rel=1e-5)
  # The first pass leaves the moving statistics; the second updates them
  # once per chunk, as the reference's chunked forward does.
  for ours, theirs in zip(stats, ref_stats):
    assert_close(ours, theirs, rel=1e-6)


def test_the_compiled_step_updates_like_the_reference():
  """training.make_train_step with --grad_cache_chunks=2, as run.py traces
  it (the chunks ordered by control dependencies, the moving statistics
  put back between the passes), against the reference's gradients applied
  by the same optimizer: the same weights and moving statistics after."""
  cfg = _config(grad_cache_chunks=2)
  strategy = tf.distribute.get_strategy()
  model = _model(cfg, strategy)
  start = [v.numpy() for v in model.variables]
  images, labels = _batch(0)
  _, grads = reference_gradients(model, images, labels, cfg, 2, strategy)
  model_lib.build_optimizer(0.5, cfg).apply_gradients(
      zip(grads, model.trainable_variables))
  expected = [v.numpy() for v in model.variables]
  # What the step must change: the moving statistics and every variable
  # with a gradient (at initialisation the first layers of each residual
  # branch get none: the branch's last batch norm starts at gamma 0).
  moving = {v.name for v in grad_cache._moving_statistics(model)}  # pylint: disable=protected-access
  moving |= {v.name for v, g in zip(model.trainable_variables, grads)
             if np.any(g.numpy())}
  for variable, value in zip(model.variables, start):
    variable.assign(value)
  step = tf.function(training.make_train_step(
      model, model_lib.build_optimizer(0.5, cfg), cfg))
  terms = step(images, labels)
  assert set(terms) == {'contrast_loss', 'contrast_acc', 'contrast_entropy',
                        'supervised_loss', 'supervised_acc', 'weight_decay',
                        'total_loss'}
  for variable, value, before in zip(model.variables, expected, start):
    assert_close(variable.numpy(), value, rel=1e-5)
    if variable.name in moving:
      assert not np.array_equal(value, before), variable.name
  assert len(moving) == 41 + 2 * 24  # gradients; a mean and a variance per BN


def test_settings_it_cannot_run_stop_with_one_line():
  with pytest.raises(ConfigError, match='grad_cache_chunks=2 with '
                     'train_mode=finetune: the gradient cache is for the '
                     'contrastive loss of pretraining; use 1.'):
    _config(grad_cache_chunks=2, train_mode='finetune')
  with pytest.raises(ConfigError, match='with jit_compile'):
    _config(grad_cache_chunks=2, jit_compile=True)
  with pytest.raises(ConfigError, match=r'^--grad_cache_chunks=3 does not '
                     'divide the 8 examples per replica'):
    runtime.check_strategy(_config(grad_cache_chunks=3),
                           tf.distribute.get_strategy())
