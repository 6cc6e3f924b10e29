"""The names this model's variables have in the original TF1 checkpoints.

The released checkpoints in `gs://simclr-checkpoints/` were written by the
original's TF1 code, which names variables, not objects:

- encoder: `base_model/conv2d[_N]/kernel` (and `/bias` for squeeze-excite
  convs) and `base_model/batch_normalization[_M]/{gamma,beta,moving_mean,
  moving_variance}`, numbered by two graph-wide counters (convs, batch norms)
  in the order the layers were built, with no per-block scope;
- projection head: `head_contrastive/<nl_j | l_0>/dense/kernel` and
  `head_contrastive/<nl_j | l_0>/batch_normalization/...`;
- supervised head: `head_supervised/linear_layer/dense/{kernel,bias}`;
- plus optimizer state (`global_step`, `<name>/Momentum`) and, in released
  SimCLRv2 checkpoints, `ema_model/<name>` copies.

This project builds its layers in the same order as the TF1 code (and as the
original TF2 code, whose checkpoint keys this project shares), so replaying
the two counters over the model's variables in creation order gives the TF1
name of each. Tests pin the result against the TF1 manifests in
../shared/fixtures_tf1.
"""
ENCODER = 'base_model'
PROJECTION_HEAD = 'head_contrastive'
SUPERVISED_HEAD = 'head_supervised'
EMA_PREFIX = 'ema_model/'
# Variables of TF1 training that are not model weights: the step counter,
# LARS/momentum slots, and the memory bank some released variants carry.
OPTIMIZER_STATE = ('global_step',)
SLOT_SUFFIX = '/Momentum'

_ENCODER_KEY = 'model/resnet_model/'
_HEAD_KEY = 'model/_projection_head/linear_layers/'
_SUPERVISED_KEY = 'model/supervised_head/'


def _numbered(base, index):
  return base if index == 0 else f'{base}_{index}'


def encoder_layers(model, by_key):
  """[(kind, {leaf: checkpoint key})] of the encoder's layers, first built first.

  kind is 'conv2d' or 'batch_normalization'; leaves are `kernel`, `bias`,
  `gamma`, `beta`, `moving_mean`, `moving_variance`.
  """
  key_of = {id(variable): key for key, variable in by_key.items()}
  layers = {}  # insertion-ordered: layer path -> {leaf: key}
  for variable in model.variables_in_creation_order():
    key = key_of.get(id(variable))
    if key is not None and key.startswith(_ENCODER_KEY):
      layer, leaf = key.rsplit('/', 1)
      layers.setdefault(layer, {})[leaf] = key
  return [('batch_normalization' if 'moving_mean' in leaves else 'conv2d',
           leaves) for leaves in layers.values()]


def tf1_names(model, by_key):
  """{checkpoint key: TF1 variable name} for every variable of `model`.

  Args:
    model: a built `model.Model`.
    by_key: its variables by checkpoint key,
      `checkpoints.variables_by_key(tf.train.Checkpoint(model=model))`.

  Raises:
    ValueError: for a variable the TF1 layout has no place for.
  """
  names = {}
  # Encoder: one counter per layer kind, advanced at each new layer.
  counters = {'conv2d': 0, 'batch_normalization': 0}
  for kind, leaves in encoder_layers(model, by_key):
    layer_name = _numbered(kind, counters[kind])
    counters[kind] += 1
    for leaf, key in leaves.items():
      names[key] = f'{ENCODER}/{layer_name}/{leaf}'
  head = getattr(model, '_projection_head', None)
  for key in by_key:
    if key.startswith(_HEAD_KEY):
      j, sublayer, rest = key[len(_HEAD_KEY):].split('/', 2)
      tf1_layer = head.linear_layers[int(j)].name
      # `bn_relu/bn/gamma` -> `batch_normalization/gamma`.
      part = ('dense/' + rest if sublayer == 'dense' else
              'batch_normalization/' + rest.split('/', 1)[1])
      names[key] = f'{PROJECTION_HEAD}/{tf1_layer}/{part}'
    elif key.startswith(_SUPERVISED_KEY):
      names[key] = f'{SUPERVISED_HEAD}/{key[len(_SUPERVISED_KEY):]}'
  unnamed = sorted(set(by_key) - set(names))
  if unnamed:
    raise ValueError(f'no TF1 name for {unnamed[0]} (and {len(unnamed) - 1} '
                     'more): the TF1 layout has no such variable.')
  return names


def is_model_weight(name):
  """Whether a TF1 checkpoint entry is a model weight (not optimizer state)."""
  name = name[len(EMA_PREFIX):] if name.startswith(EMA_PREFIX) else name
  return (name.split('/', 1)[0] in (ENCODER, PROJECTION_HEAD, SUPERVISED_HEAD)
          and not name.endswith(SLOT_SUFFIX))


def is_tf1_checkpoint(keys):
  """Whether checkpoint keys are TF1 names (no object graph, `base_model/`)."""
  return any(k.startswith(ENCODER + '/') or
             k.startswith(EMA_PREFIX + ENCODER + '/') for k in keys)
