"""Initialising a model from a checkpoint, loudly.

`restore_model` reads a TF2 object-based checkpoint (written by this project
or by the original TF2 code: the keys are the same) and assigns every model
variable it finds, filtered by a regex over variable names (`--variable_schema`).
It reports what was restored, what the schema skipped and what the
checkpoint lacked, and fails with one line when the encoder was not restored
or a shape does not match, instead of the original's silent
`expect_partial()`.
"""
import dataclasses
import re

from absl import logging
import tensorflow as tf
from tensorflow.python.checkpoint import graph_view
from tensorflow.python.checkpoint import util as checkpoint_util

SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
ENCODER_PREFIX = 'model/resnet_model/'


class CheckpointError(ValueError):
  """A checkpoint cannot be used; the message is one line for the user."""


def variables_by_key(root):
  """{checkpoint key: variable} for a trackable root (e.g. a tf.train.Checkpoint).

  Keys are what `tf.train.list_variables` prints for a checkpoint of `root`,
  without the `/.ATTRIBUTES/VARIABLE_VALUE` suffix. Uses TensorFlow's own
  path logic (an internal module) so the keys cannot drift from TF's.
  """
  view = graph_view.ObjectGraphView(root)
  objects, _, _, _, paths = (
      checkpoint_util.objects_ids_and_slot_variables_and_paths(view))
  return {paths[o]: o for o in objects if isinstance(o, tf.Variable)}


def is_saved_model(path):
  return tf.io.gfile.exists(f'{path.rstrip("/")}/saved_model.pb')


def resolve_checkpoint_path(path):
  """A checkpoint prefix from a prefix or a directory, or a CheckpointError.

  A SavedModel directory resolves to its `variables/variables` prefix.
  """
  if tf.io.gfile.isdir(path):
    if is_saved_model(path):
      prefix = f'{path.rstrip("/")}/variables/variables'
      if not tf.io.gfile.exists(f'{prefix}.index'):
        raise CheckpointError(f'--checkpoint={path}: SavedModel without '
                              'variables (variables/variables.index missing).')
      return prefix
    latest = tf.train.latest_checkpoint(path)
    if latest:
      return latest
    raise CheckpointError(f'--checkpoint={path}: directory holds neither a '
                          'checkpoint ("checkpoint" state file) nor a '
                          'SavedModel (saved_model.pb).')
  if not tf.io.gfile.exists(f'{path}.index'):
    raise CheckpointError(f'--checkpoint={path}: no such checkpoint '
                          f'({path}.index does not exist).')
  return path


@dataclasses.dataclass
class RestoreReport:
  path: str
  restored: list
  skipped_by_schema: list
  missing: list

  def summary(self):
    return (f'restored {len(self.restored)} variables from {self.path}; '
            f'{len(self.skipped_by_schema)} skipped by --variable_schema; '
            f'{len(self.missing)} not in the checkpoint (left as '
            'initialised)')


def restore_model(model, path, schema='.*', require_encoder=True):
  """Assigns the model's variables from the checkpoint at `path`.

  Args:
    model: a built `model.Model` (all variables exist).
    path: checkpoint prefix or directory.
    schema: regex; a variable is restored only if `re.match(schema, name)`
      matches its name (e.g. `(?!head_supervised)` keeps the classifier).
    require_encoder: raise unless every encoder variable was restored.

  Returns:
    A RestoreReport (also logged).
  """
  prefix = resolve_checkpoint_path(path)
  try:
    reader = tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError) as e:
    raise CheckpointError(f'--checkpoint={prefix}: cannot be read '
                          f'({type(e).__name__}).') from None
  saved_shapes = reader.get_variable_to_shape_map()
  ours = variables_by_key(tf.train.Checkpoint(model=model))
  # Training checkpoints key variables by object path, as ours are; a
  # SavedModel in the released format keys them by export position.
  saved_key_of = (saved_model_keys(model) if is_saved_model(path)
                  else {key: key + SUFFIX for key in ours})
  report = RestoreReport(prefix, [], [], [])
  pattern = re.compile(schema)
  for key in sorted(ours):
    variable = ours[key]
    saved_key = saved_key_of.get(key, key + SUFFIX)
    name = variable.name.split(':')[0]
    if saved_key not in saved_shapes:
      report.missing.append(key)
      continue
    if not pattern.match(name):
      report.skipped_by_schema.append(key)
      continue
    if list(saved_shapes[saved_key]) != variable.shape.as_list():
      raise CheckpointError(
          f'--checkpoint={prefix}: {key} has shape '
          f'{list(saved_shapes[saved_key])} there but '
          f'{variable.shape.as_list()} in this model (another model size?).')
    try:
      value = reader.get_tensor(saved_key)
    except (tf.errors.OpError, ValueError, IndexError) as e:
      raise CheckpointError(
          f'--checkpoint={prefix}: cannot read {key} '
          f'({type(e).__name__}; truncated or corrupt data file?).') from None
    variable.assign(value)
    report.restored.append(key)
  logging.info('%s', report.summary())
  for key in report.skipped_by_schema:
    logging.info('  skipped by schema: %s', key)
  for key in report.missing:
    logging.info('  not in checkpoint: %s', key)
  if require_encoder:
    lost = [k for k in report.missing + report.skipped_by_schema
            if k.startswith(ENCODER_PREFIX)]
    if lost:
      raise CheckpointError(
          f'--checkpoint={prefix}: {len(lost)} encoder variables were not '
          f'restored (e.g. {lost[0]}): wrong checkpoint or --variable_schema.')
  return report


def saved_model_keys(model):
  """{checkpoint key: SavedModel variable key} for the released format.

  The released SavedModels (and this project's exports) store the trainable
  variables as `trainable_variables_list/<i>` (i = position in the exporting
  model's `trainable_variables`, nothing frozen) and the batch-norm moving
  statistics as `model/<layer>/variables/<j>` (j = position in that layer's
  `variables`). Both orders are those of a model with nothing frozen, so
  layers frozen by `fine_tune_after_block` are unfrozen while they are read.
  """
  encoder = model.resnet_model
  frozen = [layer for layer in (list(encoder.initial_conv_relu_max_pool) +
                                list(encoder.block_groups))
            if not layer.trainable]
  # The private flag, not the `trainable` setter: the setter would also
  # change the inner batch-norm layers, which must keep training mode.
  for layer in frozen:
    layer._trainable = True  # pylint: disable=protected-access
  try:
    return _saved_model_keys_of(model)
  finally:
    for layer in frozen:
      layer._trainable = False  # pylint: disable=protected-access


def _saved_model_keys_of(model):
  key_of = {id(v): k for k, v in
            variables_by_key(tf.train.Checkpoint(model=model)).items()}
  mapping = {}
  for attr in ('resnet_model', '_projection_head', 'supervised_head'):
    if hasattr(model, attr):
      for j, variable in enumerate(getattr(model, attr).variables):
        mapping[key_of[id(variable)]] = f'model/{attr}/variables/{j}{SUFFIX}'
  for i, variable in enumerate(model.trainable_variables):
    mapping[key_of[id(variable)]] = f'trainable_variables_list/{i}{SUFFIX}'
  return mapping
