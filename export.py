"""SavedModel export in the released SimCLR format, plus a serving signature.

The exported object is called as `loaded(inputs, trainable=False)` (or True)
with float32 images [N, H, W, 3] in [0, 1] and returns a dict with
`initial_conv`, `initial_max_pool`, `block_group1..4`, `final_avg_pool`,
`proj_head_input`, `proj_head_output` and (with a supervised head)
`logits_sup`, like the released SimCLRv1/v2 SavedModels. `trainable=True`
runs batch norm on batch statistics and updates its moving averages, as the
released models do; unlike the original's export, no random augmentation is
baked into it. `trainable_variables_list` exposes the variables to fine-tune,
and the `serving_default` signature (images -> logits, probabilities,
features) serves through TF Serving.
"""
import os

from absl import logging
import tensorflow as tf

import storage


class SimCLRExport(tf.Module):
  """What is saved: the model, its trainable variables and the calls."""

  def __init__(self, model):
    super().__init__()
    self.model = model
    # Saved under this name so a loaded model can be fine-tuned by taking
    # gradients with respect to `loaded.trainable_variables_list`.
    self.trainable_variables_list = list(model.trainable_variables)

  @tf.function
  def __call__(self, inputs, trainable):
    # `inputs`: the released models' argument name (m(inputs=x, ...) works).
    return self.model.endpoints(inputs, training=trainable)

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.float32, name='images')])
  def serve(self, images):
    outputs = self.model.endpoints(images, training=False)
    served = {'features': outputs['final_avg_pool'],
              'projection': outputs['proj_head_output']}
    if 'logits_sup' in outputs:
      served['logits'] = outputs['logits_sup']
      served['probabilities'] = tf.nn.softmax(outputs['logits_sup'])
    return served


def export_saved_model(model, export_dir):
  """Writes the SavedModel of `model` to `export_dir` (atomically)."""
  module = SimCLRExport(model)
  spec = tf.TensorSpec([None, None, None, 3], tf.float32, name='inputs')
  # One concrete function per Python bool, as in the released models.
  module.__call__.get_concrete_function(spec, True)
  module.__call__.get_concrete_function(spec, False)
  tmp_dir = export_dir.rstrip('/') + '.tmp'
  storage.remove(tmp_dir)
  try:
    tf.saved_model.save(module, tmp_dir,
                        signatures={'serving_default': module.serve})
  except Exception as e:  # pylint: disable=broad-except
    if not storage.is_write_error(e):
      raise
    storage.remove(tmp_dir)  # an earlier export of this step stays whole
    raise storage.failed(
        'the SavedModel', export_dir, e, storage.nbytes(model.variables),
        'the checkpoints are saved: free some space and rerun the same '
        'command to export.') from None
  storage.remove(export_dir)
  tf.io.gfile.rename(tmp_dir, export_dir)
  logging.info('Exported SavedModel to %s', export_dir)
  return export_dir


def export_and_rotate(model, model_dir, global_step, keep_max):
  """Exports to <model_dir>/saved_model/<step>, keeping the newest `keep_max`."""
  root = os.path.join(model_dir, 'saved_model')
  path = export_saved_model(model, os.path.join(root, str(int(global_step))))
  steps = sorted(int(d.rstrip('/')) for d in tf.io.gfile.listdir(root)
                 if d.rstrip('/').isdigit())
  for step in steps[:-keep_max] if keep_max else []:
    tf.io.gfile.rmtree(os.path.join(root, str(step)))
  return path
