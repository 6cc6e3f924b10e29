"""TF1 checkpoints of the original (gs://simclr-checkpoints) load here.

The TF1 names come from tf1_names.py's rule and are checked against the
names and pairings the original TF1 code produced (../shared/fixtures_tf1).
Checkpoints in the TF1 format are written offline with
`tf.compat.v1.train.Saver`, holding the deterministic weights of
fixtures_det/det_weights.py keyed by TF1 name, and must reproduce the forward
outputs the original TF1 code computed from the same weights.
"""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import conftest
import helpers
import model as model_lib
import tf1_names
from config import Config

TF1 = conftest.SHARED / 'fixtures_tf1'
CONFIGS = {
    'r18_cifar': dict(resnet_depth=18, image_size=32),
    'r50_1x_sk0': dict(resnet_depth=50, image_size=224),
    'r50_1x_sk1': dict(resnet_depth=50, sk_ratio=0.0625, image_size=224),
    'r50_2x_sk1': dict(resnet_depth=50, width_multiplier=2, sk_ratio=0.0625,
                       image_size=224),
}
CLASSES = {'r18_cifar': 10}
# The TF1 README's schemas: base network only; base network and projection
# head (SimCLRv2 fine-tuning from a middle layer of the head).
SCHEMA_BASE = '(?!global_step|(?:.*/|^)Momentum|head)'
SCHEMA_BASE_AND_HEAD = '(?!global_step|(?:.*/|^)Momentum|head_supervised)'


def det_weights():
  path = str(conftest.require(conftest.FIXTURES_DET))
  if path not in sys.path:
    sys.path.insert(0, path)
  import det_weights as module  # pylint: disable=import-outside-toplevel
  return module


def read_manifest(config, section):
  """[(TF1 name, dtype, shape)] of one section of a TF1 manifest."""
  path = conftest.require(TF1 / f'manifest_tf1_{config}.txt')
  entries, current = [], None
  for line in open(path):
    if line.startswith('['):
      current = line[1:line.index(']')]
    elif current == section and line.strip() and not line.startswith('#'):
      name, dtype, shape = line.split()
      entries.append((name, dtype, json.loads(shape)))
  return entries


def symbolic_names(cfg, num_classes):
  """{TF1 name: (checkpoint key, shape)} of a model built in graph mode."""
  with tf.Graph().as_default():
    model = model_lib.Model(num_classes, cfg)
    model(tf.compat.v1.placeholder(
        tf.float32, [1, cfg.image_size, cfg.image_size, 3]), training=False)
    by_key = checkpoints.variables_by_key(tf.train.Checkpoint(model=model))
    names = tf1_names.tf1_names(model, by_key)
    return {names[k]: (k, v.shape.as_list()) for k, v in by_key.items()}


@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_names_pair_with_the_originals_keys(config):
  """Each TF1 name pairs with the same TF2 key and shape as in the original."""
  path = conftest.require(TF1 / f'map_tf1_to_tf2_{config}.txt')
  expected = {}
  for line in open(path):
    if not line.startswith('#'):
      name, key, shape = line.split()
      expected[name] = (key, json.loads(shape))
  cfg = Config(lineareval_while_pretraining=True, **CONFIGS[config])
  assert symbolic_names(cfg, CLASSES.get(config, 1000)) == expected


@pytest.mark.parametrize('mode', ['pretrain', 'finetune'])
@pytest.mark.parametrize('config', ['r18_cifar', 'r50_1x_sk1'])
def test_every_manifest_entry_accounted_for(config, mode):
  """Model weights are exactly the model's names; the rest optimizer state."""
  entries = read_manifest(config, f'{mode} creation_order')
  cfg = Config(train_mode=mode, lineareval_while_pretraining=False,
               **CONFIGS[config])
  ours = symbolic_names(cfg, CLASSES.get(config, 1000))
  weights = {n: s for n, d, s in entries if tf1_names.is_model_weight(n)}
  assert weights == {n: shape for n, (_, shape) in ours.items()}
  rest = {n for n, _, _ in entries} - set(weights)
  assert rest == {'global_step'} | {
      n for n in rest if n.endswith('/Momentum') and
      n[:-len('/Momentum')] in weights}


def write_tf1_checkpoint(prefix, entries, value_of):
  """A name-based checkpoint as the TF1 code's Saver writes it."""
  with tf.Graph().as_default():
    variables = [tf.compat.v1.Variable(value_of(n, d, s), name=n)
                 for n, d, s in entries]
    saver = tf.compat.v1.train.Saver(variables)
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      return saver.save(session, str(prefix), global_step=7)


def det_value(name, dtype, shape):
  if name == 'global_step':
    return np.array(7, dtype)
  if dtype != 'float32':
    return np.zeros(shape, dtype)
  return det_weights().value_for(name, shape, dtype)


@pytest.fixture(scope='module')
def r18_tf1(tmp_path_factory):
  """The r18_cifar finetune graph's checkpoint (with slots and global_step)."""
  prefix = tmp_path_factory.mktemp('tf1') / 'model.ckpt'
  entries = read_manifest('r18_cifar', 'finetune creation_order')
  return write_tf1_checkpoint(prefix, entries, det_value)


def tf1_model(cfg, num_classes=10):
  model = model_lib.Model(num_classes, cfg)
  model(tf.zeros([1, cfg.image_size, cfg.image_size, 3]), training=False)
  return model


def assert_matches_tf1_reference(model, ref, images=slice(None), rel=1e-4):
  inputs = tf.constant(ref['inputs'][images])
  outputs = model.endpoints(inputs, training=False)
  head = model._projection_head.linear_layers  # pylint: disable=protected-access
  nl_0 = head[0](outputs['final_avg_pool'], training=False)
  outputs['proj_nl_0_out'] = nl_0
  outputs['proj_nl_1_out'] = head[1](tf.nn.relu(nl_0), training=False)
  for key in ('final_avg_pool', 'proj_nl_0_out', 'proj_nl_1_out',
              'proj_head_output', 'logits_sup'):
    helpers.assert_close(outputs[key], ref[key][images], rel)
  if images == slice(None) or images == slice(0, 1):
    # The spatial endpoints are stored for image 0 only.
    for key in ('initial_conv', 'initial_max_pool', 'block_group1',
                'block_group2', 'block_group3', 'block_group4'):
      helpers.assert_close(outputs[key][:1], ref[key], rel)


def test_r18_tf1_checkpoint_reproduces_tf1_outputs(r18_tf1):
  ref = np.load(conftest.require(TF1 / 'tf1_r18_cifar.npz'))
  model = tf1_model(Config(train_mode='finetune', **CONFIGS['r18_cifar']))
  report = checkpoints.restore_model(model, r18_tf1)
  assert report.format == 'TF1 name-based checkpoint'
  assert (len(report.restored), report.missing) == (121, [])
  # 65 momentum slots and global_step are optimizer state, not weights.
  assert len(report.unused) == 66
  assert all(k == 'global_step' or k.endswith('/Momentum')
             for k in report.unused)
  assert_matches_tf1_reference(model, ref)


def test_r50_sk1_tf1_checkpoint_reproduces_tf1_outputs(tmp_path):
  """ResNet-50 with selective kernels at 64 pixels (the ResNet-D stem).

  Images 1-3 are ill-conditioned in the reference (saturated SK softmax,
  see fixtures_tf1/README.md): image 0 within 1e-4, all within 2e-2.
  """
  ref = np.load(conftest.require(TF1 / 'tf1_r50_1x_sk1.npz'))
  entries = [e for e in read_manifest('r50_1x_sk1', 'finetune creation_order')
             if tf1_names.is_model_weight(e[0])]
  prefix = write_tf1_checkpoint(tmp_path / 'model.ckpt', entries, det_value)
  cfg = Config(train_mode='finetune', **dict(CONFIGS['r50_1x_sk1'],
                                             image_size=64))
  model = tf1_model(cfg, 1000)
  report = checkpoints.restore_model(model, prefix)
  assert (len(report.restored), report.missing, report.unused) == (387, [], [])
  assert_matches_tf1_reference(model, ref, slice(0, 1), 1e-4)
  assert_matches_tf1_reference(model, ref, slice(None), 2e-2)


@pytest.mark.parametrize('schema,expected_prefixes', [
    (SCHEMA_BASE, ('base_model/',)),
    (SCHEMA_BASE_AND_HEAD, ('base_model/', 'head_contrastive/')),
    ('.*', ('base_model/', 'head_contrastive/', 'head_supervised/')),
])
def test_readme_schemas_select_exactly(r18_tf1, schema, expected_prefixes):
  model = tf1_model(Config(train_mode='finetune', **CONFIGS['r18_cifar']))
  names = tf1_names.tf1_names(
      model, checkpoints.variables_by_key(tf.train.Checkpoint(model=model)))
  report = checkpoints.restore_model(model, r18_tf1, schema)
  restored = {names[k] for k in report.restored}
  assert restored == {n for n in names.values()
                      if n.startswith(expected_prefixes)}
  assert {names[k] for k in report.skipped_by_schema} == (
      set(names.values()) - restored)


def test_ema_weights_chosen_by_flag(tmp_path):
  """Released v2 checkpoints carry `ema_model/` copies; the flag picks them."""
  entries = [e for e in read_manifest('r18_cifar', 'finetune creation_order')
             if tf1_names.is_model_weight(e[0])]
  ema = [('ema_model/' + n, d, s) for n, d, s in entries
         if not n.startswith('head_supervised')]

  def value(name, dtype, shape):
    if name.startswith('ema_model/'):
      return det_value(name[len('ema_model/'):], dtype, shape)
    return det_value(name, dtype, shape) * 1.5  # raw weights: not the EMA

  prefix = write_tf1_checkpoint(tmp_path / 'model.ckpt', entries + ema, value)
  ref = np.load(conftest.require(TF1 / 'tf1_r18_cifar.npz'))
  cfg = Config(train_mode='finetune', **CONFIGS['r18_cifar'])
  model = tf1_model(cfg)
  report = checkpoints.restore_model(model, prefix, SCHEMA_BASE_AND_HEAD,
                                     use_ema=True)
  assert len(report.restored) == 119  # base_model and head_contrastive
  assert report.unused == sorted(n[len('ema_model/'):] for n, _, _ in ema)  # their raw copies
  outputs = model.endpoints(tf.constant(ref['inputs']), training=False)
  helpers.assert_close(outputs['proj_head_output'], ref['proj_head_output'],
                       1e-4)
  raw = tf1_model(cfg)
  checkpoints.restore_model(raw, prefix, SCHEMA_BASE_AND_HEAD)
  raw_out = raw.endpoints(tf.constant(ref['inputs']), training=False)
  assert helpers.max_rel_diff(raw_out['proj_head_output'],
                              ref['proj_head_output']) > 1e-2


def test_ema_flag_without_ema_copies_is_one_clear_line(r18_tf1):
  model = tf1_model(Config(train_mode='finetune', **CONFIGS['r18_cifar']))
  with pytest.raises(checkpoints.CheckpointError,
                     match='--use_ema_weights but the checkpoint has no '
                           'ema_model/'):
    checkpoints.restore_model(model, r18_tf1, use_ema=True)


def test_pre_2021_classifier_on_projection_output(tmp_path):
  """`ft_proj_selector=-1` checkpoints have a [128, classes] classifier."""
  entries = [(n, d, [128, 10] if n.endswith('dense/kernel') and
              n.startswith('head_supervised') else s)
             for n, d, s in read_manifest('r18_cifar',
                                          'finetune creation_order')
             if tf1_names.is_model_weight(n)]
  prefix = write_tf1_checkpoint(tmp_path / 'model.ckpt', entries, det_value)
  cfg = Config(train_mode='finetune', **CONFIGS['r18_cifar'])
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.restore_model(tf1_model(cfg), prefix)
  assert str(error.value).count('\n') == 0
  assert ('head_supervised/linear_layer/dense/kernel has shape [128, 10] '
          'there but [512, 10] in this model') in str(error.value)
  assert '--ft_proj_selector=-1' in str(error.value)
  model = tf1_model(cfg.replace(ft_proj_selector=-1))
  checkpoints.restore_model(model, prefix)
  ref = np.load(conftest.require(TF1 / 'tf1_r18_cifar.npz'))
  kernel = det_value('head_supervised/linear_layer/dense/kernel', 'float32',
                     [128, 10])
  bias = det_value('head_supervised/linear_layer/dense/bias', 'float32', [10])
  outputs = model.endpoints(tf.constant(ref['inputs']), training=False)
  helpers.assert_close(outputs['logits_sup'],
                       ref['proj_head_output'] @ kernel + bias, 1e-4)


def test_wrong_model_size_names_first_mismatch(r18_tf1):
  model = tf1_model(Config(train_mode='finetune', resnet_depth=50,
                           image_size=32))
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(
                         'base_model/conv2d_1/kernel has shape [1, 1, 64, 64] '
                         'there but [1, 1, 64, 256] in this model')):
    checkpoints.restore_model(model, r18_tf1)


def test_encoder_layers_the_model_lacks_are_an_error(tmp_path):
  entries = [e for e in read_manifest('r18_cifar', 'finetune creation_order')
             if tf1_names.is_model_weight(e[0])]
  entries.append(('base_model/conv2d_21/kernel', 'float32', [3, 3, 512, 512]))
  prefix = write_tf1_checkpoint(tmp_path / 'model.ckpt', entries, det_value)
  model = tf1_model(Config(train_mode='finetune', **CONFIGS['r18_cifar']))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'1 encoder variables have no place in this model '
                           r'\(e.g. base_model/conv2d_21/kernel\)'):
    checkpoints.restore_model(model, prefix)


def test_convert_then_finetune_two_steps(r18_tf1, tmp_path, shapes10_dir):
  """TF1 -> TF2 checkpoint + SavedModel (outputs checked) -> run.py finetune."""
  out = tmp_path / 'converted'
  result = subprocess.run(
      [sys.executable, 'run.py', '--mode=convert', f'--checkpoint={r18_tf1}',
       f'--model_dir={out}', '--resnet_depth=18', '--image_size=32'],
      cwd=conftest.ROOT, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert (summary['format'], summary['restored'], summary['num_classes']) == (
      'TF1 name-based checkpoint', 121, 10)
  assert max(summary['max_rel_diff'].values()) <= 1e-5
  assert summary['tf2_checkpoint'].endswith('ckpt-7')
  # The converted SavedModel gives the TF1 reference outputs.
  ref = np.load(conftest.require(TF1 / 'tf1_r18_cifar.npz'))
  loaded = tf.saved_model.load(summary['saved_model'])
  outputs = loaded(tf.constant(ref['inputs']), trainable=False)
  for key in ('final_avg_pool', 'proj_head_output', 'logits_sup'):
    helpers.assert_close(outputs[key], ref[key], 1e-4)
  # The TF1 README's 1%-subset command: whole network from the head's
  # first layer, classifier left out by the schema.
  model_dir = tmp_path / 'finetune'
  result = subprocess.run(
      [sys.executable, 'run.py', '--train_mode=finetune',
       f'--checkpoint={summary["saved_model"]}', '--zero_init_logits_layer',
       '--fine_tune_after_block=-1', f'--variable_schema={SCHEMA_BASE_AND_HEAD}',
       '--global_bn=True', '--optimizer=lars', '--learning_rate=0.005',
       '--learning_rate_scaling=sqrt', '--weight_decay=0', '--warmup_epochs=0',
       '--num_proj_layers=3', '--ft_proj_selector=1', '--dataset=shapes10',
       f'--data_dir={shapes10_dir}', '--image_size=32', '--resnet_depth=18',
       '--train_batch_size=8', '--train_steps=2', '--mode=train',
       '--use_tpu=False', '--use_blur=False', f'--model_dir={model_dir}'],
      cwd=conftest.ROOT, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert tf.train.latest_checkpoint(str(model_dir)).endswith('ckpt-2')
  assert 'restored 119 variables' in result.stderr
  assert '2 skipped by --variable_schema' in result.stderr


def test_run_linear_eval_from_tf1_checkpoint(r18_tf1, tmp_path, shapes10_dir):
  """The TF1 README's linear-evaluation command on a TF1 checkpoint: the
  frozen encoder keeps the checkpoint's weights, the head is trained."""
  import training  # pylint: disable=import-outside-toplevel
  cfg = Config(
      mode='train', train_mode='finetune', fine_tune_after_block=4,
      zero_init_logits_layer=True, variable_schema=SCHEMA_BASE,
      global_bn=False, optimizer='momentum', learning_rate=0.1,
      weight_decay=0.0, warmup_epochs=0, train_steps=1, train_batch_size=8,
      dataset='shapes10', data_dir=str(shapes10_dir), image_size=32,
      resnet_depth=18, checkpoint=r18_tf1, model_dir=str(tmp_path / 'm'),
      use_tpu=False, use_blur=False, train_summary_steps=0).validate()
  training.run(cfg)
  reader = tf.train.load_checkpoint(str(tmp_path / 'm'))
  tf2_key = {n: k for n, (k, _) in symbolic_names(cfg, 10).items()}

  def saved(name):
    return reader.get_tensor(tf2_key[name] + helpers.SUFFIX)

  for name in ('base_model/conv2d/kernel', 'base_model/conv2d_20/kernel',
               'base_model/batch_normalization_20/gamma'):
    np.testing.assert_array_equal(saved(name),
                                  det_value(name, 'float32', saved(name).shape))
  name = 'head_contrastive/nl_0/dense/kernel'  # left out by the schema
  assert not np.allclose(saved(name),
                         det_value(name, 'float32', saved(name).shape))
  assert np.abs(saved('head_supervised/linear_layer/dense/bias')).max() > 0


def test_v1_weight_scale_rescaled_by_converter(tmp_path, capsys):
  """SimCLRv1 conv kernels are ~16.8x SimCLRv2's (original README); the
  converter's --kernel_scale brings them back without changing the outputs.

  A 'v1-scale' checkpoint holds the deterministic weights with every conv
  kernel and its batch norm's moving mean x16.8 and moving variance x16.8^2:
  the same function (but for BN's epsilon). Rescaled by 1/16.8 it must hold
  the deterministic weights again and give the TF1 reference outputs.
  """
  import convert_checkpoint  # pylint: disable=import-outside-toplevel
  scale = 16.8

  def v1_value(name, dtype, shape):
    value = det_value(name, dtype, shape)
    leaf = name.rsplit('/', 1)[-1]
    if name.startswith('base_model/') and leaf in ('kernel', 'moving_mean'):
      return value * scale
    if name.startswith('base_model/') and leaf == 'moving_variance':
      return value * scale**2
    return value

  entries = [e for e in read_manifest('r18_cifar', 'finetune creation_order')
             if tf1_names.is_model_weight(e[0])]
  prefix = write_tf1_checkpoint(tmp_path / 'v1.ckpt', entries, v1_value)
  summary = convert_checkpoint.convert(
      prefix, str(tmp_path / 'out'), Config(**CONFIGS['r18_cifar']),
      kernel_scale=1 / scale)
  rms = summary['conv_kernel_rms']
  assert rms['source'] / rms['converted'] == pytest.approx(scale, rel=1e-5)
  assert max(summary['max_rel_diff'].values()) <= 1e-5
  ref = np.load(conftest.require(TF1 / 'tf1_r18_cifar.npz'))
  outputs = tf.saved_model.load(summary['saved_model'])(
      tf.constant(ref['inputs']), trainable=False)
  for key in ('final_avg_pool', 'proj_head_output', 'logits_sup'):
    helpers.assert_close(outputs[key], ref[key], 1e-4)

  # run.py --mode=convert exits 1 with one line when the outputs differ
  # by more than --convert_tolerance (here half of what this conversion
  # gives: rescaling moves batch norm's epsilon, so it is not 0).
  worst = max(summary['max_rel_diff'].values())
  assert worst > 0
  argv = ['--mode=convert', f'--checkpoint={prefix}', '--resnet_depth=18',
          '--image_size=32', f'--kernel_scale={1 / scale!r}']
  code = helpers.run_main_exit_code(
      [*argv, f'--model_dir={tmp_path / "strict"}',
       f'--convert_tolerance={worst / 2!r}'])
  assert code == 1
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith('error: converted outputs differ from the source by')
  assert f'--convert_tolerance={worst / 2}' in last
