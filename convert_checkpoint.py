r"""Converts any SimCLR checkpoint to a TF2 checkpoint and a released-format SavedModel.

  python run.py --mode=convert --checkpoint=<TF1 checkpoint | TF2 checkpoint |
      SavedModel> --model_dir=<dir> --resnet_depth=50 --width_multiplier=1 \
      --sk_ratio=0.0625 --image_size=224 [--use_ema_weights]

run.py's `--mode=convert` calls `convert` (this module reads no flags). The
source decides the heads: a supervised head is built (with the source's
number of classes) when the source has one. Writes `<dir>/ckpt-<step>`
(+ `checkpoint` state file: pass `--checkpoint=<dir>` to run.py) and
`<dir>/saved_model/`, then checks that
both give the source model's outputs (and, for a SavedModel source, the
source's own outputs) and prints one JSON line with the differences and
the encoder's conv-kernel scale (SimCLRv1 kernels are about 16.8x larger
than SimCLRv2 ones; `--kernel_scale` rescales them without changing what
the network computes); run.py exits 1 when a difference exceeds
`--convert_tolerance`.
"""
import os

import numpy as np
import tensorflow as tf

import checkpoints
import export
import tf1_names
import model as model_lib

ENDPOINTS = ('block_group4', 'final_avg_pool', 'proj_head_output',
             'logits_sup')


def source_step(prefix):
  """The training step recorded in a checkpoint (0 when there is none)."""
  reader = tf.train.load_checkpoint(prefix)
  for key in ('global_step', 'global_step/.ATTRIBUTES/VARIABLE_VALUE'):
    if reader.has_tensor(key):
      return int(reader.get_tensor(key))
  return 0


def conv_kernel_rms(model):
  """Mean over the encoder's conv kernels of their root mean square."""
  by_key = checkpoints.variables_by_key(tf.train.Checkpoint(model=model))
  kernels = [by_key[leaves['kernel']]
             for kind, leaves in tf1_names.encoder_layers(model, by_key)
             if kind == 'conv2d']
  return float(np.mean([np.sqrt(np.mean(np.square(k.numpy())))
                        for k in kernels]))


def rescale_conv_kernels(model, factor):
  """Scales each encoder conv kernel that feeds a batch norm by `factor`.

  The batch norm's moving mean is scaled by `factor` and its moving variance
  by `factor**2`, so inference computes the same function except for the
  batch norm's epsilon (now relatively `1 / factor**2` larger). Convs that
  feed no batch norm (selective-kernel mixing, squeeze-excite) are left
  alone: their scale is not normalised away. Returns how many were scaled.
  """
  by_key = checkpoints.variables_by_key(tf.train.Checkpoint(model=model))
  layers = tf1_names.encoder_layers(model, by_key)
  scaled = 0
  for (kind, conv), (next_kind, bn) in zip(layers, layers[1:]):
    if kind == 'conv2d' and next_kind == 'batch_normalization':
      for key, power in ((conv['kernel'], 1), (bn['moving_mean'], 1),
                         (bn['moving_variance'], 2)):
        by_key[key].assign(by_key[key] * factor**power)
      scaled += 1
  return scaled


def _max_rel_diff(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def _compare(outputs, reference):
  return max(_max_rel_diff(outputs[k], reference[k])
             for k in ENDPOINTS if k in reference)


def convert(source, target, cfg, use_ema=False, kernel_scale=1.0):
  """Converts `source` into `target`; returns a summary dict.

  Args:
    source: checkpoint prefix or directory, any format restore_model reads.
    target: output directory.
    cfg: a Config giving the architecture (its heads are set from the source).
    use_ema: read a TF1 checkpoint's `ema_model/` weights.
    kernel_scale: see `rescale_conv_kernels` (1: unchanged).
  """
  prefix = checkpoints.resolve_checkpoint_path(source)
  num_classes = checkpoints.supervised_classes(source)
  cfg = cfg.replace(train_mode='pretrain', fine_tune_after_block=-1,
                    lineareval_while_pretraining=num_classes is not None,
                    checkpoint=source, use_ema_weights=use_ema)
  images = tf.constant(np.random.RandomState(0).uniform(
      0, 1, (2, cfg.image_size, cfg.image_size, 3)).astype(np.float32))

  def fresh_model():
    built = model_lib.Model(num_classes or 1, cfg)
    built(images[:1], training=False)
    return built

  model = fresh_model()
  report = checkpoints.restore_model(model, source, use_ema=use_ema)
  expected = model.endpoints(images, training=False)
  rms = {'source': conv_kernel_rms(model)}
  diffs = {}
  if kernel_scale != 1:
    rescale_conv_kernels(model, kernel_scale)
    rms['converted'] = conv_kernel_rms(model)
    source_outputs = expected
    expected = model.endpoints(images, training=False)
    # Reported, not checked: batch norm's epsilon now weighs differently.
    rescale_effect = _compare(expected, source_outputs)
  tf.io.gfile.makedirs(target)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                       target, max_to_keep=1)
  written = manager.save(checkpoint_number=source_step(prefix))
  saved_model_dir = export.export_saved_model(
      model, os.path.join(target, 'saved_model'))

  reloaded = fresh_model()
  checkpoints.restore_model(reloaded, written)
  loaded = tf.saved_model.load(saved_model_dir)
  diffs['tf2_checkpoint'] = _compare(
      reloaded.endpoints(images, training=False), expected)
  diffs['saved_model'] = _compare(loaded(images, trainable=False), expected)
  if checkpoints.is_saved_model(source) and kernel_scale == 1:
    diffs['source_saved_model'] = _compare(
        tf.saved_model.load(source)(images, trainable=False), expected)
  summary = {
      'source': source, 'format': report.format,
      'restored': len(report.restored), 'missing': len(report.missing),
      'unused': len(report.unused), 'num_classes': num_classes,
      'tf2_checkpoint': written, 'saved_model': saved_model_dir,
      'conv_kernel_rms': rms, 'max_rel_diff': diffs,
  }
  if kernel_scale != 1:
    summary['rescale_effect_rel'] = rescale_effect
  return summary
