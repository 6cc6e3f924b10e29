"""Loss, LARS, learning-rate schedule, batch norm and blur against the values
the original computed (numerics.npz of ../shared/fixtures_det and fixtures)."""
import numpy as np
import pytest
import tensorflow as tf

from helpers import assert_close
import data_util
import metrics
import model as model_lib
import objective
import resnet
from config import Config
from lars_optimizer import LARSOptimizer


# ---------------------------------------------------------------- NT-Xent

@pytest.mark.parametrize('norm', [1, 0])
@pytest.mark.parametrize('temperature', [0.5, 0.1])
def test_ntxent_single_replica(det, norm, temperature):
  tag = f'contrast/hn{norm}_t{temperature}'
  loss, logits_ab, labels = objective.add_contrastive_loss(
      tf.constant(det['contrast/hidden']), hidden_norm=bool(norm),
      temperature=temperature)
  assert_close(loss, det[f'{tag}/loss'])
  assert_close(logits_ab, det[f'{tag}/logits_ab'])
  np.testing.assert_array_equal(labels, det[f'{tag}/labels'])


@pytest.mark.parametrize('tag,norm,temperature', [
    ('t0.5', True, 0.5), ('t0.1', True, 0.1), ('nonorm_t1.0', False, 1.0)])
def test_ntxent_and_its_metrics(ref, tag, norm, temperature):
  loss, logits_ab, labels = objective.add_contrastive_loss(
      tf.constant(ref['ntxent/hidden']), hidden_norm=norm,
      temperature=temperature)
  assert_close(loss, ref[f'ntxent/{tag}/loss'])
  assert_close(logits_ab, ref[f'ntxent/{tag}/logits_ab'])
  np.testing.assert_array_equal(labels, ref[f'ntxent/{tag}/labels'])
  assert_close(metrics.contrastive_accuracy(logits_ab, labels),
               ref[f'ntxent/{tag}/contrast_acc'])
  assert_close(metrics.contrastive_entropy(logits_ab),
               ref[f'ntxent/{tag}/contrast_entropy'])


def _two_replica_ntxent(strategy, per_replica_hidden, temperature):
  """Runs add_contrastive_loss in each of 2 replicas (MirroredStrategy)."""
  values = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(per_replica_hidden[ctx.replica_id_in_sync_group]))

  @tf.function
  def run(hidden):
    def replica_fn(h):
      with tf.GradientTape() as tape:
        tape.watch(h)
        loss, logits_ab, labels = objective.add_contrastive_loss(
            h, hidden_norm=True, temperature=temperature, strategy=strategy)
        scaled = loss / strategy.num_replicas_in_sync
      return loss, logits_ab, labels, tape.gradient(scaled, h)
    return strategy.run(replica_fn, (hidden,))

  outputs = run(values)
  return [[t.numpy() for t in strategy.experimental_local_results(o)]
          for o in outputs]


@pytest.mark.parametrize('temperature', [0.5, 0.1])
def test_ntxent_two_replicas_fixture_det(det, mirrored2, temperature):
  hidden = [det['mirrored2/hidden_replica0'], det['mirrored2/hidden_replica1']]
  losses, logits, labels, _ = _two_replica_ntxent(mirrored2, hidden,
                                                  temperature)
  tag = f'mirrored2/hn1_t{temperature}'
  for r in range(2):
    assert_close(losses[r], det[f'{tag}/loss_replica{r}'])
    assert_close(logits[r], det[f'{tag}/logits_ab_replica{r}'])
    np.testing.assert_array_equal(labels[r], det[f'{tag}/labels_replica{r}'])


@pytest.mark.parametrize('temperature', [0.5, 0.1])
def test_ntxent_two_replicas_equal_one_device(ref, mirrored2, temperature):
  """Per-replica values of the fixture, and the same mean loss and gradient
  as one device that sees the global batch."""
  hidden = ref['ntxent2/hidden']  # replica r: rows [8r, 8r + 8)
  losses, logits, labels, grads = _two_replica_ntxent(
      mirrored2, [hidden[:8], hidden[8:]], temperature)
  tag = f'ntxent2/t{temperature}'
  assert_close(losses, ref[f'{tag}/loss'])
  assert_close(np.stack(logits), ref[f'{tag}/logits_ab'])
  np.testing.assert_array_equal(np.stack(labels), ref[f'{tag}/labels'])

  # One device: view 1 of both replicas, then view 2 of both.
  order = list(range(0, 4)) + list(range(8, 12)) + list(range(4, 8)) + \
      list(range(12, 16))
  full = tf.constant(hidden[order])
  with tf.GradientTape() as tape:
    tape.watch(full)
    loss, _, _ = objective.add_contrastive_loss(full, True, temperature)
  full_grad = tape.gradient(loss, full).numpy()
  assert abs(np.mean(losses) - float(loss)) < 1e-5
  # Two replicas each average over half the anchors: their gradients (of
  # loss / 2) summed over replicas equal the one-device gradient.
  local_rows = np.concatenate(grads)[np.argsort(order)]
  assert_close(local_rows, full_grad, rel=1e-5)
  assert np.abs(full_grad).max() > 1e-3  # a gradient worth comparing


def test_supervised_loss(det, ref):
  for logits, labels, loss in ((det['sup/logits'], det['sup/labels'],
                                det['sup/loss']),
                               (ref['suploss/logits'], ref['suploss/labels'],
                                ref['suploss/loss'])):
    assert_close(objective.add_supervised_loss(labels, logits), loss)


# ------------------------------------------------------------------- LARS

LARS_EXCLUDE = ['batch_normalization', 'bias', 'head_supervised']
DET_LARS_VARIANTS = {
    'default': {}, 'nesterov': dict(use_nesterov=True),
    'nonclassic': dict(classic_momentum=False),
    'nonclassic_nesterov': dict(classic_momentum=False, use_nesterov=True)}


def _run_lars(names, inits, grads_per_step, **kwargs):
  variables = [tf.Variable(v, name=n) for n, v in zip(names, inits)]
  optimizer = LARSOptimizer(exclude_from_weight_decay=LARS_EXCLUDE, **kwargs)
  history = []
  for grads in grads_per_step:
    optimizer.apply_gradients(
        zip([tf.constant(g) for g in grads], variables))
    history.append([(v.numpy(), optimizer.get_slot(v, 'Momentum').numpy())
                    for v in variables])
  return optimizer, variables, history


@pytest.mark.parametrize('variant', sorted(DET_LARS_VARIANTS))
def test_lars_fixture_det(det, variant):
  names = ['conv2d/kernel', 'batch_normalization/gamma', 'dense/bias',
           'head_supervised/linear_layer/dense/kernel', 'conv2d_1/kernel']
  _, _, history = _run_lars(
      names, [det[f'lars/init/{n}'] for n in names],
      [[det[f'lars/grads/step{s}/{n}'] for n in names] for s in range(3)],
      learning_rate=0.1, momentum=0.9, weight_decay=1e-2,
      **DET_LARS_VARIANTS[variant])
  for s, values in enumerate(history):
    for n, (value, slot) in zip(names, values):
      assert_close(value, det[f'lars/{variant}/step{s}/{n}'], rel=1e-6)
      assert_close(slot, det[f'lars/{variant}/step{s}/{n}/Momentum'], rel=1e-6)


REF_LARS_SETTINGS = {
    'default': dict(learning_rate=0.1, weight_decay=1e-6),
    'wd1e-3_lr1': dict(learning_rate=1.0, weight_decay=1e-3),
    'nesterov': dict(learning_rate=1.0, weight_decay=1e-3, use_nesterov=True),
    'nonclassic': dict(learning_rate=1.0, weight_decay=1e-3,
                       classic_momentum=False),
    'nonclassic_nesterov': dict(learning_rate=1.0, weight_decay=1e-3,
                                classic_momentum=False, use_nesterov=True)}


@pytest.mark.parametrize('setting', sorted(REF_LARS_SETTINGS))
def test_lars_name_rules_and_updates(ref, setting):
  names = [str(n) for n in ref['lars/var_names']]
  optimizer, variables, history = _run_lars(
      names, [ref[f'lars/init/{i}'] for i in range(len(names))],
      [[ref[f'lars/grad/{i}/step{k}'] for i in range(len(names))]
       for k in (1, 2, 3)],
      momentum=0.9, **REF_LARS_SETTINGS[setting])
  np.testing.assert_array_equal(
      [optimizer._use_weight_decay(v.name) for v in variables],  # pylint: disable=protected-access
      ref[f'lars/{setting}/uses_weight_decay'])
  np.testing.assert_array_equal(
      [optimizer._do_layer_adaptation(v.name) for v in variables],  # pylint: disable=protected-access
      ref[f'lars/{setting}/uses_layer_adaptation'])
  assert int(optimizer.iterations) == int(ref[f'lars/{setting}/iterations'])
  for k, values in zip((1, 2, 3), history):
    for i, (value, slot) in enumerate(values):
      assert_close(value, ref[f'lars/{setting}/step{k}/{i}'], rel=1e-6)
      assert_close(slot, ref[f'lars/{setting}/step{k}/momentum/{i}'], rel=1e-6)


# ---------------------------------------------------- learning-rate schedule

DET_SCHEDULES = {
    'a': dict(learning_rate=0.3, learning_rate_scaling='linear',
              train_batch_size=512, warmup_epochs=10, train_epochs=100,
              train_steps=0, num_examples=50000),
    'b': dict(learning_rate=0.075, learning_rate_scaling='sqrt',
              train_batch_size=4096, warmup_epochs=10, train_epochs=100,
              train_steps=0, num_examples=1281167),
    'c': dict(learning_rate=0.5, learning_rate_scaling='linear',
              train_batch_size=128, warmup_epochs=2.5, train_epochs=100,
              train_steps=600, num_examples=5000),
}


def _schedule(learning_rate, num_examples, **flags):
  cfg = Config(learning_rate=learning_rate, **flags)
  return model_lib.WarmUpAndCosineDecay(cfg.learning_rate, num_examples, cfg)


@pytest.mark.parametrize('tag', sorted(DET_SCHEDULES))
def test_schedule_fixture_det(det, tag):
  schedule = _schedule(**DET_SCHEDULES[tag])
  for suffix in ('', '_extra'):
    steps = det[f'lr_sched/{tag}/steps{suffix}']
    values = [float(schedule(tf.constant(s, tf.float32))) for s in steps]
    assert_close(values, det[f'lr_sched/{tag}/values{suffix}'], rel=1e-6)


@pytest.mark.parametrize('tag', ['imagenet_linear', 'imagenet_sqrt',
                                 'cifar_readme', 'steps_nowarmup',
                                 'fractional_warmup', 'r18_fixture'])
def test_schedule_warmup_total_and_values(ref, tag):
  lr, scaling, batch, warmup, epochs, steps, examples = ref[f'lr/{tag}/config']
  schedule = _schedule(
      learning_rate=float(lr),
      learning_rate_scaling='sqrt' if scaling else 'linear',
      train_batch_size=int(batch), warmup_epochs=float(warmup),
      train_epochs=int(epochs), train_steps=int(steps),
      num_examples=int(examples))
  assert schedule.warmup_steps == int(ref[f'lr/{tag}/warmup_steps'])
  assert schedule.total_steps == int(ref[f'lr/{tag}/train_steps_total'])
  values = [float(schedule(tf.constant(s, tf.float32)))
            for s in ref[f'lr/{tag}/steps']]
  assert_close(values, ref[f'lr/{tag}/values'], rel=1e-6)


# ------------------------------------------------------------- batch norm

@pytest.mark.parametrize('global_bn', [1, 0])
def test_batch_norm_relu(det, global_bn):
  layer = resnet.BatchNormRelu(relu=True, global_bn=bool(global_bn),
                               batch_norm_decay=0.9)
  x = tf.constant(det['bn/x'])
  layer(x, training=False)
  for name in ('gamma', 'beta', 'moving_mean', 'moving_variance'):
    getattr(layer.bn, name).assign(det[f'bn/init/{name}'])
  tag = f'bn/global_bn{global_bn}'
  assert_close(layer(x, training=False), det[f'{tag}/out_eval'])
  assert_close(layer(x, training=True), det[f'{tag}/out_train'])
  assert_close(layer.bn.moving_mean, det[f'{tag}/moving_mean_after'])
  assert_close(layer.bn.moving_variance, det[f'{tag}/moving_variance_after'])


# ------------------------------------------------------------------- blur

@pytest.mark.parametrize('source,kernel,sigma', [
    ('img32', 3, 0.5), ('img64', 6, 1.0), ('img64', 22, 1.5)])
def test_gaussian_blur_fixture_det(det, source, kernel, sigma):
  out = data_util.gaussian_blur(tf.constant(det[f'blur/{source}']), kernel,
                                sigma)
  assert_close(out, det[f'blur/{source}_k{kernel}_s{sigma}'])


def test_gaussian_blur_batched(det, ref):
  out = data_util.gaussian_blur(tf.constant(det['blur/batch2_32']), 3, 1.0)
  assert_close(out, det['blur/batch2_32_k3_s1.0'])
  img = ref['data/img32_u8'].astype(np.float32) / 255.
  for sigma in (0.5, 1.0, 1.9):
    assert_close(data_util.gaussian_blur(img, 3, sigma),
                 ref[f'data/blur32_k3_sigma{sigma}'])
  assert_close(data_util.gaussian_blur(img, 3, 1.0, padding='VALID'),
               ref['data/blur32_k3_sigma1.0_valid'])
  batch = np.stack([img, 1 - img])
  assert_close(data_util.gaussian_blur(batch, 3, 1.0),
               ref['data/blur32_batch_k3_sigma1.0'])
  big = ref['data/img256x320_u8'][:64, :64].astype(np.float32) / 255.
  assert_close(data_util.gaussian_blur(big, 22, 1.5),
               ref['data/blur64_k22_sigma1.5'])


def test_batch_random_blur_mixes_per_image():
  """Each image is either untouched or blurred; p=0 and p=1 are exact."""
  images = tf.random.stateless_uniform([6, 32, 32, 3], seed=[1, 2])
  kept = data_util.batch_random_blur([images], 32, 32, 0.0, seed=3)[0]
  np.testing.assert_array_equal(kept, images)
  blurred = data_util.batch_random_blur([images], 32, 32, 1.0, seed=3)[0]
  assert (np.abs(blurred - images).max(axis=(1, 2, 3)) > 1e-3).all()
