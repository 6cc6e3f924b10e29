"""Parity with the original on ../shared/fixtures_det: keys, names, outputs,
losses and one full training step, with weights assigned by checkpoint key."""
import json
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import conftest
import helpers
import model as model_lib
import objective
import training

CONFIGS = ['r18_cifar_pretrain', 'r18_sk_se_pretrain', 'r50_sk_finetune',
           'r18_finetune_after4']
NUM_EXAMPLES = 50000  # the stub dataset's size, which sets the LR schedule
# Configs with a `<config>_update.npz` (r50 is ill-conditioned at batch 4).
UPDATE_CONFIGS = ('r18_cifar_pretrain', 'r18_sk_se_pretrain',
                  'r18_finetune_after4')
# The update's l2 norm and its 4 projections may differ from the original's
# by this fraction of its norm: a few times the kernel-order noise of the
# pretraining steps (batch-8 projection-head BN; compare with
# TF_ENABLE_ONEDNN_OPTS=0). A wrong direction of the same norm (LARS on
# permuted gradients) moves the projections by about 4x the norm (fixture
# README), a flipped momentum by 2x.
UPDATE_TOL = 5e-2


class Case:
  """One fixture config: the model built as the original's run.py builds it."""

  def __init__(self, name, tmp_path):
    det_dir = conftest.require(conftest.FIXTURES_DET)
    if str(det_dir) not in sys.path:
      sys.path.insert(0, str(det_dir))
    import det_weights  # pylint: disable=import-outside-toplevel
    self.det_weights = det_weights
    self.name = name
    self.fx = np.load(det_dir / f'{name}.npz')
    flags = json.loads((det_dir / 'configs.json').read_text())[name]['flags']
    self.config = helpers.config_from_flags(flags).validate()
    self.manifest = helpers.read_manifest(det_dir / f'manifest_{name}.txt')
    self.pretrain = self.config.train_mode == 'pretrain'
    self.big = 'r50' in name  # ill-conditioned at batch 4 (fixture README)
    # Fresh Keras name counters, so variable names are those of a fresh
    # process, as in the manifests.
    keras.backend.clear_session()
    self.model = model_lib.Model(10, self.config)
    self.schedule = schedule = model_lib.WarmUpAndCosineDecay(
        self.config.learning_rate,
        NUM_EXAMPLES, self.config)
    self.optimizer = model_lib.build_optimizer(schedule, self.config)
    self.inputs = tf.constant(self.fx['inputs'])
    self.model(self.one_view_batch(), training=False)
    self.checkpoint = tf.train.Checkpoint(
        model=self.model, global_step=self.optimizer.iterations,
        optimizer=self.optimizer)
    self.tmp_path = tmp_path

  def one_view_batch(self):
    """The N images fed to the encoder: pretrain stacks view 1 on view 2."""
    if self.pretrain:
      return tf.concat(tf.split(self.inputs, 2, axis=-1), 0)
    return self.inputs

  def assign(self):
    self.det_weights.assign_all(helpers.variables_by_key(self.checkpoint))

  def forward(self, training):
    """(hiddens, proj_out, sup_in, logits) from the sub-layers, in order."""
    self.assign()
    model = self.model
    hiddens = model.resnet_model(self.one_view_batch(), training=training)
    proj_out, sup_in = model._projection_head(hiddens, training=training)  # pylint: disable=protected-access
    logits = model.supervised_head(sup_in, training=training)
    return hiddens, proj_out, sup_in, logits


@pytest.fixture(scope='module', params=CONFIGS)
def case(request, tmp_path_factory):
  return Case(request.param, tmp_path_factory.mktemp(request.param))


def test_variable_names_and_trainability_match_manifest(case):
  """Names matter twice: LARS and weight decay select variables by them."""
  keys = helpers.variables_by_key(case.checkpoint)
  for key, variable in keys.items():
    if not key.startswith('model/'):
      continue
    _, _, name, trainable = case.manifest[key]
    assert variable.name == name, key
  trainable = {id(v) for v in case.model.trainable_variables}
  expected = {k for k, entry in case.manifest.items()
              if k.startswith('model/') and '.OPTIMIZER_SLOT' not in k
              and entry[3] == '1'}
  assert {k for k, v in keys.items() if id(v) in trainable} == expected


@pytest.mark.parametrize('training', [False, True])
def test_forward_outputs_match(case, training):
  hiddens, proj_out, sup_in, logits = case.forward(training)
  prefix = 'train' if training else 'eval'
  # Tolerances: ~10x the original's own sensitivity (fixture README).
  if case.big:
    tol = dict(hiddens=3e-2, proj_out=3e-2, sup_in=3e-2, logits=3e-2)
  elif training:
    tol = dict(hiddens=5e-5, proj_out=1e-3, sup_in=5e-5, logits=5e-5)
  else:
    tol = dict(hiddens=1e-5, proj_out=1e-5, sup_in=1e-5, logits=1e-5)
  outputs = dict(hiddens=hiddens, proj_out=proj_out, sup_in=sup_in,
                 logits=logits)
  for name, value in outputs.items():
    diff = helpers.max_rel_diff(value.numpy(), case.fx[f'{prefix}/{name}'])
    assert diff <= tol[name], (name, diff)


def test_contrastive_loss_of_training_outputs(case):
  if not case.pretrain:
    pytest.skip('finetune configs have no contrastive loss')
  _, proj_out, _, _ = case.forward(training=True)
  loss, logits_ab, labels = objective.add_contrastive_loss(
      proj_out, hidden_norm=True, temperature=case.config.temperature)
  fx = case.fx
  assert abs(float(loss) - fx['contrast/loss']) <= 5e-5 * fx['contrast/loss']
  assert helpers.max_rel_diff(logits_ab.numpy(), fx['contrast/logits_ab']) < 1e-3
  np.testing.assert_array_equal(labels.numpy(), fx['contrast/labels'])


def test_one_training_step_reproduces_checkpoint(case):
  """Loss terms, every variable and slot after one step, and the saved keys."""
  case.assign()
  fx = case.fx
  step = tf.function(training.make_train_step(
      case.model, case.optimizer, case.config))
  terms = step(case.inputs, tf.constant(fx['labels_onehot']))

  loss_tol = 1e-3 if case.big else 5e-5
  for name, value in terms.items():
    expected = float(fx[f'step/{name}'])
    assert abs(float(value) - expected) <= loss_tol * max(abs(expected), 1e-3), name
  assert float(case.optimizer.iterations) == 1
  assert abs(float(case.schedule(0.)) - float(fx['step/lr'])) < 1e-9

  var_tol, slot_tol = (0.1, 0.1) if case.big else (1e-3, 1e-2)
  keys = helpers.variables_by_key(case.checkpoint)
  checked = 0
  for key, variable in keys.items():
    if not variable.dtype.is_floating:
      continue
    value = variable.numpy().astype(np.float64)
    l2, ref_l2 = np.sqrt(np.square(value).sum()), float(fx[f'step/{key}/l2'])
    ref_sum = float(fx[f'step/{key}/sum'])
    is_slot = key.startswith('optimizer/') or '.OPTIMIZER_SLOT' in key
    tol = slot_tol if is_slot else var_tol
    assert abs(l2 - ref_l2) <= tol * ref_l2 + 1e-12, key
    scale = np.sqrt(value.size) * max(ref_l2, 1e-12)
    assert abs(value.sum() - ref_sum) <= (slot_tol if case.big else 1e-2) * scale, key
    checked += 1
  assert checked == len([k for k in fx.keys() if k.endswith('/l2')])

  # Which model variables the step changed: the frozen-BN quirk of
  # fine_tune_after_block, the stop-gradients and the heads all show here.
  changed = set()
  for key, variable in keys.items():
    if case.det_weights.is_model_key(key):
      det = case.det_weights.value_for(key, variable.shape, variable.dtype)
      if not np.array_equal(variable.numpy(), det):
        changed.add(key)
  assert changed == set(fx['keys/changed_by_step'].tolist())

  if case.name in UPDATE_CONFIGS:
    _assert_updates_match(case, keys)

  # The checkpoint run.py would save: same keys, dtypes and shapes.
  prefix = case.checkpoint.save(str(case.tmp_path / 'ckpt'))
  listing = helpers.checkpoint_listing(prefix)
  expected = {k: (v[0], v[1]) for k, v in case.manifest.items()}
  assert listing == expected


def _assert_updates_match(case, keys):
  """Every float variable's and slot's one-step update, direction included.

  The update is the value after the step minus the deterministic value for a
  model variable, and the value itself for an optimizer slot (slots start at
  zero); `update_projection.summarise` reduces it to its l2 norm and four
  signed projections, which the original's step gave as `<config>_update.npz`.
  """
  det_dir = conftest.FIXTURES_DET
  import update_projection  # pylint: disable=import-outside-toplevel
  ref = np.load(conftest.require(det_dir / f'{case.name}_update.npz'))
  expected = {k[len('update/'):-len('/l2')] for k in ref.keys()
              if k.endswith('/l2')}
  checked = set()
  for key, variable in keys.items():
    if not variable.dtype.is_floating or key not in expected:
      continue
    value = variable.numpy().astype(np.float64)
    if case.det_weights.is_model_key(key):
      value = value - case.det_weights.value_for(
          key, variable.shape, variable.dtype).astype(np.float64)
    l2, proj = update_projection.summarise(key, value)
    ref_l2 = float(ref[f'update/{key}/l2'])
    ref_proj = ref[f'update/{key}/proj']
    # The floor: a few float32 roundings of the value after the step (a
    # LARS update is ~1e-5 of the weight, so one ulp is ~1% of it).
    floor = 4 * 2.**-24 * float(np.linalg.norm(variable.numpy()))
    tol = UPDATE_TOL * ref_l2 + floor + 1e-12
    assert abs(l2 - ref_l2) <= tol, (key, l2, ref_l2)
    assert np.abs(proj - ref_proj).max() <= tol, (key, proj, ref_proj)
    checked.add(key)
  assert checked == expected, sorted(expected - checked)[:5]
