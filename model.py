"""The SimCLR model (encoder + projection head + supervised head), its
learning-rate schedule, optimizer factory and weight decay.

Attribute names (`resnet_model`, `_projection_head`, `supervised_head`,
`linear_layers`, `dense`, `bn_relu`, `linear_layer`) and layer names
(`nl_<j>`, `head_supervised`) are checkpoint keys and variable names of the
original code; LARS and weight decay select variables by those names.
"""
import contextlib
import math

import tensorflow as tf
import tf_keras as keras

import augment_batch
import lars_optimizer
import resnet

# Variables whose names contain one of these get neither LARS weight decay nor
# layer adaptation (the supervised head gets an explicit L2 term instead).
LARS_EXCLUDE = ('batch_normalization', 'bias', 'head_supervised')


class LinearLayer(keras.layers.Layer):
  """Dense layer, optionally followed by batch norm (then the dense has no bias).

  `num_classes` may be a callable of the input shape, for heads whose width
  is the input's.
  """

  def __init__(self, num_classes, use_bias=True, use_bn=False,
               name='linear_layer', bn_args=None, zero_init=False, **kwargs):
    super().__init__(**kwargs)
    # Set after construction so the name is used as given, not uniquified:
    # the original's variables are `projection_head/nl_0/...`.
    self._name = name
    self.num_classes = num_classes
    self.use_bias = use_bias
    self.use_bn = use_bn
    self.zero_init = zero_init
    if use_bn:
      # With BN, `use_bias` decides the BN's beta instead of a dense bias.
      self.bn_relu = resnet.BatchNormRelu(relu=False, center=use_bias,
                                          **(bn_args or {}))

  def build(self, input_shape):
    # The dense layer is made here, after the BN, as in the original: that
    # order is the order of trainable_variables, which numbers the Keras
    # optimizers' checkpoint slots (`optimizer/_variables/<N>`).
    units = self.num_classes
    if callable(units):
      units = units(input_shape)
    self.dense = keras.layers.Dense(
        int(units), use_bias=self.use_bias and not self.use_bn,
        kernel_initializer=('zeros' if self.zero_init else
                            keras.initializers.RandomNormal(stddev=0.01)))
    super().build(input_shape)

  def call(self, inputs, training):
    if inputs.shape.ndims != 2:
      raise ValueError(f'{self.name} expects [batch, features] inputs, got '
                       f'shape {inputs.shape}.')
    outputs = self.dense(inputs)
    if self.use_bn:
      outputs = self.bn_relu(outputs, training=training)
    return outputs


class ProjectionHead(keras.layers.Layer):
  """g(.) of the paper: maps the representation to the contrastive space.

  Returns (projection output, supervised-head input): the latter is the
  `ft_proj_selector`-th entry of [input, layer 1 output, ...], so SimCLRv2
  can fine-tune from the middle of the head.
  """

  def __init__(self, mode='nonlinear', num_layers=3, out_dim=128,
               ft_proj_selector=0, bn_args=None, **kwargs):
    super().__init__(**kwargs)
    self.mode = mode
    self.ft_proj_selector = ft_proj_selector
    self.linear_layers = []
    if mode == 'linear':
      self.linear_layers.append(LinearLayer(
          out_dim, use_bias=False, use_bn=True, name='l_0', bn_args=bn_args))
    elif mode == 'nonlinear':
      for j in range(num_layers):
        last = j == num_layers - 1
        # Middle layers keep the input width and have BN beta and a ReLU.
        self.linear_layers.append(LinearLayer(
            out_dim if last else (lambda shape: shape[-1]),
            use_bias=not last, use_bn=True, name=f'nl_{j}', bn_args=bn_args))
    elif mode != 'none':
      raise ValueError(f'proj_head_mode={mode!r}: expected none, linear or '
                       'nonlinear.')

  def call(self, inputs, training):
    hiddens_list = [tf.identity(inputs)]
    for j, layer in enumerate(self.linear_layers):
      hiddens = layer(hiddens_list[-1], training=training)
      if self.mode == 'nonlinear' and j != len(self.linear_layers) - 1:
        hiddens = tf.nn.relu(hiddens)
      hiddens_list.append(hiddens)
    return hiddens_list[-1], hiddens_list[self.ft_proj_selector]


class SupervisedHead(keras.layers.Layer):
  """Linear classifier on the (selected) representation."""

  def __init__(self, num_classes, zero_init=False, name='head_supervised',
               **kwargs):
    super().__init__(name=name, **kwargs)
    self.linear_layer = LinearLayer(num_classes, zero_init=zero_init)

  def call(self, inputs, training):
    return self.linear_layer(inputs, training=training)


class Model(keras.models.Model):
  """ResNet encoder with projection head and (optionally) supervised head.

  Called as `model(features, training)` (`blurred=True`: the batch went
  through `blur_views` already) and returns
  `(projection_head_outputs, supervised_head_outputs)`, either possibly None:
  pretraining returns both (the supervised head only with
  `lineareval_while_pretraining`, on stop-gradient features); finetuning
  returns (None, logits). In pretraining with training=True, `features` is
  [B, H, W, 3 * 2] (two views on the channel axis) and outputs cover 2B rows,
  view 1 first.
  """

  def __init__(self, num_classes, config, **kwargs):
    super().__init__(**kwargs)
    # Every setting is checked once, by Config.validate (ConfigError).
    self.config = config.validate()
    bn_args = dict(global_bn=config.global_bn,
                   batch_norm_decay=config.batch_norm_decay,
                   fused=config.use_fused_batch_norm)
    self.resnet_model = resnet.resnet(config)
    self._projection_head = ProjectionHead(
        mode=config.proj_head_mode, num_layers=config.num_proj_layers,
        out_dim=config.proj_out_dim, ft_proj_selector=config.ft_proj_selector,
        bn_args=bn_args)
    if config.has_supervised_head:
      self.supervised_head = SupervisedHead(
          num_classes, zero_init=config.zero_init_logits_layer)
    # Every variable the encoder and projection head create, in creation
    # order: the TF1 checkpoints number their layers in that order
    # (tf1_names.py). Set past Keras' attribute tracking, which would make
    # the list a checkpoint dependency and add keys.
    object.__setattr__(self, '_created', [])

  def _note_creation(self, next_creator, **kwargs):
    variable = next_creator(**kwargs)
    self._created.append(variable)
    return variable

  def variables_in_creation_order(self):
    """The encoder's and projection head's variables, first created first."""
    if not self._created:
      raise ValueError('the model has no variables yet: call it once first.')
    return list(self._created)

  # `__call__` rather than `call`, as in the original: Keras' Model.__call__
  # would open a `model/` name scope and rename every variable, and the
  # outputs may be None.
  def __call__(self, inputs, training, blurred=False):
    cfg = self.config
    pretraining = training and cfg.train_mode == 'pretrain'
    if pretraining and not blurred:
      # Blur is batched here rather than per example in the input pipeline.
      inputs = self.blur_views(inputs)
    views = tf.split(inputs, 2 if pretraining else 1, axis=-1)
    # The TF1 linear-evaluation protocol: a frozen encoder's batch norm uses
    # and keeps its moving statistics while the heads train. (Exports keep
    # the released meaning of `trainable`: see `endpoints`.)
    proj_out, sup_in, _ = self._encode(
        tf.concat(views, 0), training, encoder_training=training and not (
            cfg.frozen_encoder_in_inference_mode))
    # float32 under any precision policy: the loss (a softmax over all
    # negatives) and the metrics are computed in float32.
    return tuple(None if t is None else tf.cast(t, tf.float32)
                 for t in self._heads(proj_out, sup_in, training))

  def blur_views(self, inputs):
    """A pretraining batch [B, H, W, 3 * 2] with the random blur that a
    training call applies first (when `use_blur`); call the model on the
    result with `blurred=True`, e.g. chunk by chunk (grad_cache.py)."""
    if not self.config.use_blur:
      return inputs
    views = augment_batch.batch_random_blur(
        tf.split(inputs, 2, axis=-1), self.config.image_size,
        self.config.image_size)
    return tf.concat(views, -1)

  def _encode(self, features, training, return_endpoints=False,
              encoder_training=None):
    if encoder_training is None:
      encoder_training = training
    with tf.variable_creator_scope(self._note_creation):
      encoded = self.resnet_model(features, training=encoder_training,
                                  return_endpoints=return_endpoints)
      hiddens, endpoints = encoded if return_endpoints else (encoded, None)
      proj_out, sup_in = self._projection_head(hiddens, training=training)
    return proj_out, sup_in, endpoints

  def _heads(self, proj_out, sup_in, training):
    cfg = self.config
    if cfg.train_mode == 'finetune':
      return None, self.supervised_head(sup_in, training=training)
    if cfg.lineareval_while_pretraining:
      # Linear evaluation must not shape the pretrained representation.
      return proj_out, self.supervised_head(tf.stop_gradient(sup_in),
                                            training=training)
    return proj_out, None

  def endpoints(self, images, training):
    """All named outputs for [B, H, W, 3] images (the SavedModel's dict).

    Keys: the encoder endpoints (`initial_conv` ... `final_avg_pool`),
    `proj_head_input`, `proj_head_output` and, with a supervised head,
    `logits_sup`.
    """
    proj_out, sup_in, outputs = self._encode(images, training,
                                             return_endpoints=True)
    # The projection head's input (the encoder's output), as the original
    # exports it; the classifier's input differs when ft_proj_selector > 0.
    outputs['proj_head_input'] = outputs['final_avg_pool']
    outputs['proj_head_output'] = proj_out
    if hasattr(self, 'supervised_head'):
      outputs['logits_sup'] = self.supervised_head(sup_in, training=training)
    # float32 whatever the precision policy, as the released models give.
    return {k: tf.cast(v, tf.float32) for k, v in outputs.items()}

  def zero_supervised_head(self):
    """Zeroes the classifier (after a restore), for `zero_init_logits_layer`."""
    for variable in self.supervised_head.trainable_weights:
      variable.assign(tf.zeros_like(variable))


@contextlib.contextmanager
def precision_policy(name):
  """Layers constructed and built inside use the Keras policy `name`.

  Build the model (its first call creates layers lazily) inside, e.g.
  `with precision_policy(cfg.precision): model = Model(...); model(x, False)`.
  """
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def get_train_steps(num_examples, config):
  """Training steps: `train_steps`, else epochs over `num_examples` (+1)."""
  return config.train_steps or (
      num_examples * config.train_epochs // config.train_batch_size + 1)


def get_warmup_steps(num_examples, config):
  # Floor division before rounding, as in the original (3.7 * 999 // 64 = 57).
  return int(round(config.warmup_epochs * num_examples //
                   config.train_batch_size))


def scaled_learning_rate(base_learning_rate, config):
  """Base rate scaled by batch size: `linear` (x B/256) or `sqrt` (x sqrt B)."""
  if config.learning_rate_scaling == 'linear':
    return base_learning_rate * config.train_batch_size / 256.
  if config.learning_rate_scaling == 'sqrt':
    return base_learning_rate * math.sqrt(config.train_batch_size)
  raise ValueError(f'learning_rate_scaling={config.learning_rate_scaling!r}: '
                   'expected linear or sqrt.')


class WarmUpAndCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to the scaled rate, then cosine decay to 0.

  The k-th update uses the rate at step k - 1, so with warmup the first
  update uses rate 0, as in the original.
  """

  def __init__(self, base_learning_rate, num_examples, config, name=None):
    super().__init__()
    self.base_learning_rate = base_learning_rate
    self.num_examples = num_examples
    self.warmup_steps = get_warmup_steps(num_examples, config)
    self.total_steps = get_train_steps(num_examples, config)
    self.scaled_lr = scaled_learning_rate(base_learning_rate, config)
    self._config = config
    self._name = name
    self._cosine = keras.optimizers.schedules.CosineDecay(
        self.scaled_lr, self.total_steps - self.warmup_steps)

  def __call__(self, step):
    with tf.name_scope(self._name or 'WarmUpAndCosineDecay'):
      if self.warmup_steps:
        warmup_lr = step / float(self.warmup_steps) * self.scaled_lr
      else:
        warmup_lr = self.scaled_lr
      return tf.where(step < self.warmup_steps, warmup_lr,
                      self._cosine(step - self.warmup_steps))

  def get_config(self):
    return {'base_learning_rate': self.base_learning_rate,
            'num_examples': self.num_examples}


def build_optimizer(learning_rate, config):
  """The optimizer named by `config.optimizer`: lars, momentum or adam."""
  if config.optimizer == 'momentum':
    return keras.optimizers.SGD(learning_rate, config.momentum, nesterov=True)
  if config.optimizer == 'adam':
    return keras.optimizers.Adam(learning_rate)
  if config.optimizer == 'lars':
    return lars_optimizer.LARSOptimizer(
        learning_rate, momentum=config.momentum,
        weight_decay=config.weight_decay,
        exclude_from_weight_decay=list(LARS_EXCLUDE))
  raise ValueError(f'optimizer={config.optimizer!r}: expected lars, momentum '
                   'or adam.')


def add_weight_decay(model, config, adjust_per_optimizer=True):
  """The L2 term added to the loss: wd * sum(||v||^2 / 2) over chosen variables.

  With LARS (which decays inside the update) only the supervised head's
  kernel; otherwise every trainable variable that is not a batch-norm one.
  """
  if adjust_per_optimizer and 'lars' in config.optimizer:
    l2_losses = [tf.nn.l2_loss(v) for v in model.trainable_variables
                 if 'head_supervised' in v.name and 'bias' not in v.name]
  else:
    l2_losses = [tf.nn.l2_loss(v) for v in model.trainable_weights
                 if 'batch_normalization' not in v.name]
  if not l2_losses:
    return tf.constant(0.)
  return config.weight_decay * tf.add_n(l2_losses)
