"""The exported SavedModel has the released models' call interface
(../shared/fixtures/*/signature.txt, read off SavedModels the original wrote):
argument names, one concrete function per `trainable` bool, output keys and
dtypes, and `proj_head_input` meaning the projection head's input."""
import re

import numpy as np
import pytest
import tensorflow as tf

import config as config_lib
import conftest
import export
import model as model_lib


def _released_signature(path):
  """(argument names, [(output key, dtype, rank)]) of one signature.txt."""
  text = path.read_text()
  args = sorted(set(re.findall(r"name='(\w+)'\), (True|False)\)", text)))
  outputs = sorted(set(
      (key, dtype, len(shape.split(',')) if shape.strip('()') else 0)
      for key, dtype, shape in re.findall(
          r'output (\w+)\s+(\w+) (\([^)]*\))', text)))
  return args, outputs, re.search(r'signatures: (.*)', text).group(1)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  # ft_proj_selector=1: the classifier reads the first projection layer, so
  # the classifier's input and the projection head's input differ.
  cfg = config_lib.Config(resnet_depth=18, width_multiplier=0.125,
                          image_size=32, ft_proj_selector=1,
                          global_bn=False).validate()
  model = model_lib.Model(10, cfg)
  x = tf.constant(np.random.RandomState(0).uniform(size=(4, 32, 32, 3)),
                  tf.float32)
  model(x, training=False)
  path = export.export_saved_model(
      model, str(tmp_path_factory.mktemp('export') / 'saved_model'))
  return model, tf.saved_model.load(path), x


def _ours(loaded):
  args, outputs = set(), set()
  for fn in loaded.__call__.concrete_functions:
    spec, trainable = fn.structured_input_signature[0]
    args.add((spec.name, str(trainable)))
    for key, value in fn.structured_outputs.items():
      outputs.add((key, value.dtype.name, value.shape.rank))
  return sorted(args), sorted(outputs)


@pytest.mark.parametrize('released', ['r18', 'small/r18_w0125'])
def test_call_interface_matches_released_models(exported, released):
  path = conftest.require(conftest.FIXTURES / released / 'signature.txt')
  ref_args, ref_outputs, ref_signatures = _released_signature(path)
  _, loaded, _ = exported
  args, outputs = _ours(loaded)
  assert args == ref_args == [('inputs', 'False'), ('inputs', 'True')]
  assert outputs == ref_outputs
  assert len(outputs) == 10
  # The released models have no signatures; ours adds serving_default
  # (README "Faithfulness to the original").
  assert ref_signatures == '[]'
  assert list(loaded.signatures) == ['serving_default']


def test_called_by_keyword_as_released_models_are(exported):
  model, loaded, x = exported
  out = loaded(inputs=x, trainable=False)
  ours = model.endpoints(x, training=False)
  for key, value in ours.items():
    np.testing.assert_allclose(out[key].numpy(), value.numpy(), atol=1e-5,
                               err_msg=key)


def test_proj_head_input_is_the_projection_heads_input(exported):
  model, loaded, x = exported
  out = loaded(inputs=x, trainable=False)
  np.testing.assert_array_equal(out['proj_head_input'].numpy(),
                                out['final_avg_pool'].numpy())
  # ...not the classifier's input (projection layer 1 with selector 1).
  _, sup_in = model._projection_head(out['final_avg_pool'], training=False)  # pylint: disable=protected-access
  assert sup_in.shape[-1] != out['proj_head_input'].shape[-1] or not np.allclose(
      sup_in.numpy(), out['proj_head_input'].numpy())


def test_trainable_call_updates_moving_averages_and_has_no_blur(tmp_path):
  """`trainable=True` normalises with the batch's statistics and moves the
  stored averages (checked by hand on the stem's batch norm), and bakes in
  no augmentation: exported from a pretraining config with use_blur=True,
  its outputs equal the encoder's on the unblurred images."""
  cfg = config_lib.Config(resnet_depth=18, width_multiplier=0.125,
                          image_size=32, use_blur=True).validate()
  model = model_lib.Model(10, cfg)
  x = tf.constant(np.random.RandomState(1).uniform(size=(8, 32, 32, 3)),
                  tf.float32)
  model(tf.zeros([1, 32, 32, 3]), training=False)
  loaded = tf.saved_model.load(export.export_saved_model(
      model, str(tmp_path / 'saved_model')))
  conv, _, bn_relu = model.resnet_model.initial_conv_relu_max_pool[:3]
  stored = {v.name: v for v in loaded.model.resnet_model.variables}
  moving_mean = stored[bn_relu.bn.moving_mean.name]
  moving_var = stored[bn_relu.bn.moving_variance.name]
  np.testing.assert_array_equal(moving_mean.numpy(), 0.)
  np.testing.assert_array_equal(moving_var.numpy(), 1.)

  out = loaded(x, trainable=True)
  # The stem: 3x3 stride-1 convolution, then batch norm with decay 0.9;
  # the moving variance follows the biased batch variance.
  stem = tf.nn.conv2d(x, conv.conv2d.kernel, 1, 'SAME').numpy()
  np.testing.assert_allclose(out['initial_conv'].numpy(), stem, atol=1e-5)
  mean, var = stem.mean((0, 1, 2)), stem.var((0, 1, 2))
  np.testing.assert_allclose(moving_mean.numpy(), 0.1 * mean, atol=1e-6)
  np.testing.assert_allclose(moving_var.numpy(), 0.9 + 0.1 * var, atol=1e-6)
  # Normalised with the batch's statistics, not the stored ones.
  gamma, beta = bn_relu.bn.gamma.numpy(), bn_relu.bn.beta.numpy()
  np.testing.assert_allclose(
      out['initial_max_pool'].numpy(),
      np.maximum(0., (stem - mean) / np.sqrt(var + bn_relu.bn.epsilon) *
                 gamma + beta), atol=1e-4)
  # No blur: every output is the Keras model's on x itself.
  ours = model.endpoints(x, training=True)
  for key in ('final_avg_pool', 'proj_head_output', 'logits_sup'):
    np.testing.assert_allclose(out[key].numpy(), ours[key].numpy(),
                               atol=1e-4, err_msg=key)
