"""--checkpoint restores: the original's training checkpoints and released-
format SavedModels, this project's exports, schemas and errors."""
import json

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import conftest
import export
import helpers
import model as model_lib

RUNS = ('r18_w0125', 'r50_sk1_w00625')


def _small(run, **overrides):
  folder = conftest.require(conftest.FIXTURES / 'small' / run)
  flags = json.loads((folder / 'flags.json').read_text())
  cfg = helpers.config_from_flags(flags, **overrides).validate()
  images = tf.constant(np.load(folder / 'inputs.npz')['images'])
  model = model_lib.Model(10, cfg)
  model.endpoints(images, training=False)
  return folder, model, images, np.load(folder / 'outputs.npz')


@pytest.fixture(scope='module')
def unpacked(tmp_path_factory):
  """The original's SavedModels, unpacked from their archives."""
  return {run: conftest.unpack_original_saved_model(
      run, tmp_path_factory.mktemp(run)) for run in RUNS}


def _assert_reproduces(model, images, outputs):
  ours = model.endpoints(images, training=False)
  for name, value in ours.items():
    assert helpers.max_rel_diff(value.numpy(),
                                outputs[f'savedmodel/{name}']) < 1e-4, name


@pytest.mark.parametrize('run', RUNS)
@pytest.mark.parametrize('frozen', [-1, 4])
def test_original_savedmodel_restores_every_variable(unpacked, run, frozen):
  _, model, images, outputs = _small(run, train_mode='finetune',
                                     fine_tune_after_block=frozen)
  report = checkpoints.restore_model(model, str(unpacked[run]))
  assert not report.missing and not report.skipped_by_schema
  assert len(report.restored) == len(model.variables)
  _assert_reproduces(model, images, outputs)


@pytest.mark.parametrize('run', RUNS)
def test_original_training_checkpoint_directory(run):
  folder, model, images, outputs = _small(run)
  report = checkpoints.restore_model(model, str(folder / 'ckpt'))
  assert report.path.endswith(('ckpt-3', 'ckpt-2'))
  assert len(report.restored) == len(model.variables)
  _assert_reproduces(model, images, outputs)


def test_our_export_has_the_released_layout_and_restores(tmp_path):
  """A full-width ResNet-18 export keys its variables exactly as the
  original's export of the same model (fixtures/r18)."""
  manifest = conftest.require(
      conftest.FIXTURES / 'r18' / 'manifest_saved_model_vars.txt')
  flags = json.loads((conftest.FIXTURES / 'r18' / 'flags.json').read_text())
  cfg = helpers.config_from_flags(flags).validate()
  model = model_lib.Model(10, cfg)
  images = tf.random.stateless_uniform([2, 32, 32, 3], seed=[3, 4])
  model.endpoints(images, training=False)
  path = export.export_saved_model(model, str(tmp_path / 'sm'))
  listing = helpers.checkpoint_listing(f'{path}/variables/variables')
  expected = {k: (v[0], v[1]) for k, v in helpers.read_manifest(manifest).items()
              if k != '_CHECKPOINTABLE_OBJECT_GRAPH'}
  assert listing == expected
  other = model_lib.Model(10, cfg.replace(train_mode='finetune',
                                          fine_tune_after_block=2))
  other.endpoints(images, training=False)
  checkpoints.restore_model(other, path)
  np.testing.assert_array_equal(
      other.endpoints(images, training=False)['logits_sup'],
      model.endpoints(images, training=False)['logits_sup'])


def test_schema_that_drops_the_encoder_fails_loudly():
  folder, model, _, _ = _small('r18_w0125')
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.restore_model(model, str(folder / 'ckpt'),
                              schema='(?!resnet)')
  assert 'encoder variables were not restored' in str(error.value)
  report = checkpoints.restore_model(model, str(folder / 'ckpt'),
                                     schema='(?!head_supervised)')
  assert len(report.skipped_by_schema) == 2


def test_wrong_path_and_wrong_model_size_give_one_line(tmp_path):
  folder, model, _, _ = _small('r18_w0125')
  for path, expected in ((tmp_path / 'nothing', 'no such checkpoint'),
                         (tmp_path, 'neither a checkpoint')):
    with pytest.raises(checkpoints.CheckpointError, match=expected):
      checkpoints.restore_model(model, str(path))
  r50 = conftest.FIXTURES / 'small' / 'r50_sk1_w00625' / 'ckpt'
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.restore_model(model, str(r50))
  assert 'shape' in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('schema,skipped,unmatched', [
    # The original README's: the optimizer and step parts match no model
    # variable (optimizer state is never restored from --checkpoint).
    ('(?!global_step|(?:.*/|^)Momentum|head)', 2,
     ['global_step', '(?:.*/|^)Momentum']),
    ('(?!global_step|(?:.*/|^)LARSOptimizer|head_supervised)', 2,
     ['global_step', '(?:.*/|^)LARSOptimizer']),
    ('(?!head_supervised|projection_head)', 16, []),
    ('(?!global_step)', 0, ['global_step']),
    ('resnet|projection_head|head_sup', 0, []),
])
def test_restore_report_says_what_the_schema_did(schema, skipped, unmatched,
                                                 caplog):
  caplog.set_level('INFO', logger='absl')
  folder, model, _, _ = _small('r18_w0125')
  report = checkpoints.restore_model(model, str(folder / 'ckpt'),
                                     schema=schema)
  assert len(report.skipped_by_schema) == skipped
  assert report.unmatched_schema_parts == unmatched
  # A schema that skipped nothing says so; the others do not.
  assert ('skipped nothing' in caplog.text) == (skipped == 0)
  if unmatched:
    assert ('parts of --variable_schema that match no model variable: '
            f'{", ".join(unmatched)}') in caplog.text
  else:
    assert 'match no model variable' not in caplog.text


def test_schema_alternatives():
  assert checkpoints.schema_alternatives(
      '(?!global_step|(?:.*/|^)Momentum|head)') == [
          'global_step', '(?:.*/|^)Momentum', 'head']
  assert checkpoints.schema_alternatives('a|b(c|d)|[|]') == [
      'a', 'b(c|d)', '[|]']
  assert checkpoints.schema_alternatives(r'(?!x\|y)z') == [r'(?!x\|y)z']
  assert checkpoints.schema_alternatives('(?=a|b)') == ['a', 'b']
