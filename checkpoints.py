"""Initialising a model from a checkpoint, loudly.

`restore_model` reads any of the formats SimCLR models come in: a TF2
object-based checkpoint (written by this project or by the original TF2
code: the keys are the same), a SavedModel in the released format, or a TF1
name-based checkpoint of the original (the `gs://simclr-checkpoints` bucket;
names from tf1_names.py), optionally its EMA copies. It assigns every model
variable it finds, filtered by a regex over variable names
(`--variable_schema`), reports what was restored, what the schema skipped,
what the checkpoint lacked and what it held that was not used, and fails
with one line when the encoder was not restored, a shape does not match or
the checkpoint's encoder has layers this model lacks, instead of the
original's silent `expect_partial()`.
"""
import dataclasses
import re

from absl import logging
import tensorflow as tf
from tensorflow.python.checkpoint import graph_view
from tensorflow.python.checkpoint import util as checkpoint_util

import tf1_names

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
  """What a restore did; keys are this model's checkpoint keys.

  `unused` lists the checkpoint's entries that no model variable took:
  optimizer state, a head this model lacks, EMA copies not chosen.
  `unmatched_schema_parts` lists the alternatives of `--variable_schema`
  that match no model variable's name (see `schema_alternatives`).
  """
  path: str
  format: str
  restored: list
  skipped_by_schema: list
  missing: list
  unused: list
  schema: str = '.*'
  unmatched_schema_parts: list = dataclasses.field(default_factory=list)

  def summary(self):
    return (f'restored {len(self.restored)} variables from {self.path} '
            f'({self.format}); {len(self.skipped_by_schema)} skipped by '
            f'--variable_schema; {len(self.missing)} not in the checkpoint '
            f'(left as initialised); {len(self.unused)} checkpoint entries '
            'unused (optimizer state, other heads, EMA copies)')

  def schema_notes(self):
    """Lines about a `--variable_schema` that did less than it says."""
    notes = []
    if self.schema != '.*' and not self.skipped_by_schema:
      notes.append(f'--variable_schema={self.schema!r} skipped nothing: '
                   'every model variable found in the checkpoint was '
                   'restored.')
    if self.unmatched_schema_parts:
      notes.append(
          'parts of --variable_schema that match no model variable: '
          f'{", ".join(self.unmatched_schema_parts)} (the schema filters '
          'model variables only; optimizer state and the step are never '
          'restored from --checkpoint).')
    return notes


def schema_alternatives(schema):
  """The alternatives of a schema's outermost lookahead, or of the schema.

  '(?!global_step|(?:.*/|^)Momentum|head)' gives ['global_step',
  '(?:.*/|^)Momentum', 'head']; 'base_model|head_contrastive' gives both
  names. A '|' inside a group or a character class does not split.
  """
  inner = schema
  if schema[:3] in ('(?!', '(?='):
    closes = [i for i, char, depth in _structure(schema)
              if char == ')' and depth == 0]
    if closes and closes[0] == len(schema) - 1:
      inner = schema[3:-1]
  parts, start = [], 0
  for i, char, depth in _structure(inner):
    if char == '|' and depth == 0:
      parts.append(inner[start:i])
      start = i + 1
  parts.append(inner[start:])
  return parts


def _structure(pattern):
  """(index, char, group depth after it) of each '(', ')' and '|' of a regex
  that is not escaped nor inside a character class."""
  depth, i, in_class = 0, 0, False
  while i < len(pattern):
    char = pattern[i]
    if char == '\\':
      i += 2
      continue
    if in_class:
      in_class = char != ']'
    elif char == '[':
      in_class = True
    elif char in '()|':
      depth += {'(': 1, ')': -1, '|': 0}[char]
      yield i, char, depth
    i += 1


def _unmatched_alternatives(schema, names):
  """The alternatives of `schema` that `re.match` no name in `names`."""
  if schema == '.*':
    return []
  unmatched = []
  for part in schema_alternatives(schema):
    try:
      pattern = re.compile(part)
    except re.error:
      continue  # not a regex on its own; judged as part of the whole only
    if not any(pattern.match(name) for name in names):
      unmatched.append(part)
  return unmatched


FORMATS = {
    'tf2': 'TF2 object checkpoint',
    'saved_model': 'SavedModel',
    'tf1': 'TF1 name-based checkpoint',
}


def checkpoint_format(path, keys):
  """'saved_model', 'tf2' or 'tf1' for the checkpoint at `path` with `keys`."""
  if is_saved_model(path):
    return 'saved_model'
  if '_CHECKPOINTABLE_OBJECT_GRAPH' in keys:
    return 'tf2'
  if tf1_names.is_tf1_checkpoint(keys):
    return 'tf1'
  raise CheckpointError(
      f'--checkpoint={path}: neither a TF2 object checkpoint, a SavedModel '
      'nor a TF1 SimCLR checkpoint (no base_model/ variables).')


def check_checkpoint(path, use_ema=False):
  """Fails early (CheckpointError) unless `path` is a readable checkpoint of
  a known format, with `ema_model/` copies when `use_ema`. Returns the format.
  """
  prefix = resolve_checkpoint_path(path)
  try:
    keys = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
  except (tf.errors.OpError, ValueError) as e:
    raise CheckpointError(f'--checkpoint={prefix}: cannot be read '
                          f'({type(e).__name__}).') from None
  fmt = checkpoint_format(path, keys)
  if use_ema and not any(k.startswith(tf1_names.EMA_PREFIX) for k in keys):
    raise CheckpointError(
        f'--checkpoint={path}: --use_ema_weights but the checkpoint has no '
        f'{tf1_names.EMA_PREFIX} variables ({FORMATS[fmt]}).')
  return fmt


def _layout(model, ours, fmt, saved_shapes, use_ema):
  """({our key: (saved key, name the schema sees)}, is-encoder predicate)."""
  if fmt == 'tf1':
    names = tf1_names.tf1_names(model, ours)
    encoder = tf1_names.ENCODER + '/'
    if use_ema:
      encoder = tf1_names.EMA_PREFIX + encoder

    def saved(name):
      ema = tf1_names.EMA_PREFIX + name
      return ema if use_ema and ema in saved_shapes else name

    # The schema sees the TF1 name, so the TF1 README's schemas work as is.
    layout = {key: (saved(name), name) for key, name in names.items()}
    return layout, lambda k: (k.startswith(encoder) and
                              not k.endswith(tf1_names.SLOT_SUFFIX))
  if fmt == 'saved_model':
    saved_key_of = saved_model_keys(model)
    is_encoder = lambda k: k.startswith(ENCODER_PREFIX)
  else:
    saved_key_of = {key: key + SUFFIX for key in ours}
    is_encoder = lambda k: (k.startswith(ENCODER_PREFIX) and
                            '.OPTIMIZER_SLOT' not in k)
  layout = {key: (saved_key_of.get(key, key + SUFFIX),
                  variable.name.split(':')[0])
            for key, variable in ours.items()}
  return layout, is_encoder


def _in_model_order(model, ours):
  """Our keys, encoder and projection head in creation order, then the rest."""
  key_of = {id(v): k for k, v in ours.items()}
  ordered = [key_of[id(v)] for v in model.variables_in_creation_order()
             if id(v) in key_of]
  return ordered + sorted(set(ours) - set(ordered))


def _shape_hint(model, name, saved_shape):
  if 'supervised' in name and len(saved_shape) == 2:
    if saved_shape[0] == model.config.proj_out_dim:
      return ('a checkpoint whose classifier reads the projection output: '
              'pass --ft_proj_selector=-1')
    return ('another number of classes: leave the classifier out with '
            "--variable_schema='(?!global_step|(?:.*/|^)Momentum|head)'")
  return 'another --resnet_depth, --width_multiplier or --sk_ratio?'


def restore_model(model, path, schema='.*', require_encoder=True,
                  use_ema=False):
  """Assigns the model's variables from the checkpoint at `path`.

  Args:
    model: a built `model.Model` (all variables exist).
    path: checkpoint prefix or directory: a TF2 object checkpoint (this
      project's or the original's), a SavedModel directory in the released
      format, or a TF1 name-based checkpoint of the original.
    schema: regex; a variable is restored only if `re.match(schema, name)`
      matches its name: its TF1 name for TF1 checkpoints (as in the TF1
      README, e.g. `(?!global_step|(?:.*/|^)Momentum|head)`), else its
      variable name.
    require_encoder: raise unless every encoder variable was restored.
    use_ema: read the `ema_model/` copies of a TF1 checkpoint.

  Returns:
    A RestoreReport (also logged).

  Raises:
    CheckpointError: unreadable checkpoint, a shape that does not match (one
      line naming the first such variable and both shapes), encoder
      variables the model lacks, or (with require_encoder) encoder variables
      not restored.
  """
  fmt = check_checkpoint(path, use_ema)
  prefix = resolve_checkpoint_path(path)
  reader = tf.train.load_checkpoint(prefix)
  saved_shapes = reader.get_variable_to_shape_map()
  ours = variables_by_key(tf.train.Checkpoint(model=model))
  layout, is_encoder = _layout(model, ours, fmt, saved_shapes, use_ema)
  report = RestoreReport(prefix, FORMATS[fmt], [], [], [], [], schema)
  report.unmatched_schema_parts = _unmatched_alternatives(
      schema, [layout[key][1] for key in ours])
  pattern = re.compile(schema)
  for key in _in_model_order(model, ours):
    variable = ours[key]
    saved_key, name = layout[key]
    if saved_key not in saved_shapes:
      report.missing.append(key)
      continue
    if not pattern.match(name):
      report.skipped_by_schema.append(key)
      continue
    saved_shape = list(saved_shapes[saved_key])
    if saved_shape != variable.shape.as_list():
      raise CheckpointError(
          f'--checkpoint={prefix}: {saved_key.replace(SUFFIX, "")} has shape '
          f'{saved_shape} there but {variable.shape.as_list()} in this model '
          f'({_shape_hint(model, name, saved_shape)}).')
    try:
      value = reader.get_tensor(saved_key)
    except (tf.errors.OpError, ValueError, IndexError) as e:
      raise CheckpointError(
          f'--checkpoint={prefix}: cannot read {key} '
          f'({type(e).__name__}; truncated or corrupt data file?).') from None
    variable.assign(value)
    report.restored.append(key)
  taken = {layout[k][0] for k in report.restored + report.skipped_by_schema}
  report.unused = sorted(set(saved_shapes) - taken -
                         {'_CHECKPOINTABLE_OBJECT_GRAPH'})
  extra = [k for k in report.unused if is_encoder(k)]
  if extra:
    raise CheckpointError(
        f'--checkpoint={prefix}: {len(extra)} encoder variables have no place '
        f'in this model (e.g. {extra[0].replace(SUFFIX, "")}): another '
        '--resnet_depth, --width_multiplier or --sk_ratio?')
  logging.info('%s', report.summary())
  for note in report.schema_notes():
    logging.warning('%s', note)
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


def supervised_classes(path):
  """Classes of the checkpoint's supervised head, or None without one."""
  prefix = resolve_checkpoint_path(path)
  shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
  for key, shape in shapes.items():
    if len(shape) == 1 and (
        key.startswith('model/supervised_head/') or
        key.startswith(tf1_names.SUPERVISED_HEAD + '/') or
        key.startswith(tf1_names.EMA_PREFIX + tf1_names.SUPERVISED_HEAD)):
      if '.OPTIMIZER_SLOT' not in key and not key.endswith(
          tf1_names.SLOT_SUFFIX):
        return int(shape[0])
  return None


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
