"""Tests of --mode=embed (embed.py): features of a split written to disk.

The reference is the original's own export: a SavedModel that its run.py
wrote (fixtures/small/r18_w0125) computes final_avg_pool and
proj_head_output for the same images; embedding from that SavedModel or
from the original's TF2 checkpoint must give the same arrays.
"""
import json

import numpy as np
import pytest
import tensorflow as tf

import conftest
from config import Config
import data as data_lib
import embed
from helpers import run_main_exit_code

SPLIT = 'test[:37]'  # not a multiple of the batch: padding is dropped
RUN = 'r18_w0125'


@pytest.fixture(scope='module')
def original(tmp_path_factory):
  """(SavedModel dir, TF2 checkpoint prefix) written by the original."""
  saved_model = conftest.unpack_original_saved_model(
      RUN, tmp_path_factory.mktemp('original'))
  ckpt = conftest.require(conftest.FIXTURES / 'small' / RUN / 'ckpt' /
                          'ckpt-3.index')
  return saved_model, str(ckpt)[:-len('.index')]


def _config(shapes10_dir, model_dir, **changes):
  # The original run's architecture (its flags.json): ResNet-18 at 1/8.
  settings = dict(dataset='shapes10', data_dir=str(shapes10_dir),
                  eval_split=SPLIT, resnet_depth=18, width_multiplier=0.125,
                  image_size=32, eval_batch_size=8, mode='embed',
                  embed_proj_head=True, use_tpu=False,
                  model_dir=str(model_dir))
  return Config(**{**settings, **changes}).validate()


@pytest.fixture(scope='module')
def reference(original, shapes10_dir):
  """The SavedModel's own outputs for the split's images, in order."""
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  examples = list(source.as_dataset(SPLIT).as_numpy_iterator())
  # At 32 px the evaluation preprocessing is the image in [0, 1] (no crop).
  images = tf.constant(np.stack([e['image'] for e in examples]) / 255.,
                       tf.float32)
  outputs = tf.saved_model.load(str(original[0]))(images, trainable=False)
  return {'final_avg_pool': outputs['final_avg_pool'].numpy(),
          'proj_head_output': outputs['proj_head_output'].numpy(),
          'label': np.array([e['label'] for e in examples]),
          'id': [e['id'].decode() for e in examples]}


def run_main(argv):
  """run.py's main with `argv` as its flags, in this process."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  import run  # pylint: disable=import-outside-toplevel
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['run.py', *argv])
  try:
    run.main(['run.py'])
  finally:
    flags.FLAGS.unparse_flags()


def _check(arrays, reference):
  assert arrays['final_avg_pool'].shape == (37, 64)
  assert arrays['proj_head_output'].shape == (37, 128)
  for name in ('final_avg_pool', 'proj_head_output'):
    np.testing.assert_allclose(arrays[name], reference[name], rtol=0,
                               atol=1e-5 * np.abs(reference[name]).max())
  np.testing.assert_array_equal(arrays['label'], reference['label'])
  assert list(arrays['id']) == reference['id']
  np.testing.assert_array_equal(arrays['index'], np.arange(37))


@pytest.mark.parametrize('fmt', ['saved_model', 'tf2_checkpoint'])
def test_cli_embeds_from_the_originals_formats(fmt, original, reference,
                                               shapes10_dir, tmp_path,
                                               capsys):
  checkpoint = str(original[0] if fmt == 'saved_model' else original[1])
  run_main([
      '--mode=embed', f'--checkpoint={checkpoint}', '--dataset=shapes10',
      f'--data_dir={shapes10_dir}', f'--eval_split={SPLIT}',
      '--resnet_depth=18', '--width_multiplier=0.125', '--image_size=32',
      '--eval_batch_size=8', '--embed_proj_head', '--use_tpu=False',
      f'--model_dir={tmp_path}'])
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  path = tmp_path / 'embeddings' / 'test.-37.npz'
  assert summary == {
      'embeddings': str(path), 'split': SPLIT, 'examples': 37,
      'checkpoint': checkpoint, 'final_avg_pool': [37, 64],
      'proj_head_output': [37, 128]}
  with np.load(path) as arrays:  # no pickle needed
    _check(dict(arrays), reference)


def test_two_replicas_embed_every_example_once(original, reference,
                                               shapes10_dir, tmp_path,
                                               mirrored2):
  cfg = _config(shapes10_dir, tmp_path, checkpoint=str(original[0]))
  model, _ = embed.load_model(cfg, mirrored2)
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  # 37 examples, 2 replicas of 4: 5 steps, the last with 3 padding rows.
  _check(embed.embed_split(cfg, source, mirrored2, model), reference)


def test_only_the_encoder_without_embed_proj_head(original, reference,
                                                  shapes10_dir, tmp_path):
  cfg = _config(shapes10_dir, tmp_path, checkpoint=str(original[1]),
                embed_proj_head=False)
  summary = embed.embed(cfg)
  with np.load(summary['embeddings']) as arrays:
    assert sorted(arrays) == ['final_avg_pool', 'id', 'index', 'label']


def test_without_weights_one_line(shapes10_dir, tmp_path, capsys):
  code = run_main_exit_code([
      '--mode=embed', '--dataset=shapes10', f'--data_dir={shapes10_dir}',
      '--eval_split=test', '--use_tpu=False', f'--model_dir={tmp_path}'])
  assert code == 2
  assert capsys.readouterr().err.strip() == (
      'error: --mode=embed needs weights: no --checkpoint and no checkpoint '
      f'in --model_dir={tmp_path}.')


def test_output_names():
  assert [embed.output_path('/m', s) for s in ('train[:10%]', 'train[10%:]',
                                                'a/b c')] == [
      '/m/embeddings/train.-10%.npz', '/m/embeddings/train.10%-.npz',
      '/m/embeddings/a_b_c.npz']
  assert embed.output_path('gs://b/m', 'test') == 'gs://b/m/embeddings/test.npz'


def test_an_unlabelled_folder_in_path_order(tmp_path):
  """Images of different sizes at any depth: label -1, ids the relative
  paths, each row the features of its own image (3 images, batches of 2)."""
  import data_util  # pylint: disable=import-outside-toplevel
  import runtime  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  paths = ['a.png', 'b/c.png', 'b/d/e.png']
  images = {}
  for i, rel in enumerate(paths):
    images[rel] = rng.randint(0, 256, (20 + 3 * i, 17, 3)).astype(np.uint8)
    (tmp_path / 'photos' / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'photos' / rel).write_bytes(
        tf.io.encode_png(images[rel]).numpy())
  cfg = Config(dataset=f'unlabelled:{tmp_path / "photos"}', eval_split='train',
               resnet_depth=18, width_multiplier=0.125, image_size=16,
               eval_batch_size=2, lineareval_while_pretraining=False,
               mode='embed', model_dir=str(tmp_path / 'm')).validate()
  strategy = tf.distribute.get_strategy()
  model = runtime.build_model(cfg, 0, strategy)
  arrays = embed.embed_split(cfg, data_lib.source_for(cfg), strategy, model)
  assert list(arrays['id']) == paths
  np.testing.assert_array_equal(arrays['label'], [-1, -1, -1])
  for row, rel in zip(arrays['final_avg_pool'], paths):
    image = data_util.preprocess_image(images[rel], 16, 16, is_training=False,
                                       test_crop=True)
    expected = model.endpoints(image[None], training=False)['final_avg_pool']
    np.testing.assert_allclose(row, expected[0], rtol=0, atol=1e-5)
