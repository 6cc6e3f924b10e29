"""ResNet encoders of SimCLR: ResNet-18..200, width multiplier, SK and SE.

Post-activation ResNets (He et al. 2015) with the SimCLRv2 options: selective
kernels (Li et al. 2019, `sk_ratio`), which also switch to the ResNet-D deep
stem and average-pool shortcuts (He et al. 2018), and squeeze-excitation
(Hu et al. 2017, `se_ratio`).

Layer class names and attribute names are an interface, not a style choice:
Keras derives variable names from class names (`SK_Conv2D` -> `sk__conv2d`)
and `tf.train.Checkpoint` keys from attribute names and list positions
(`block_groups/0/layers/1/conv2d_bn_layers/2/conv2d/kernel`). They and the
order in which layers are created are those of the original SimCLR TF2 code,
so its checkpoints and SavedModels load here. Parameter-free layers (padding,
pooling, DropBlock, identities) occupy list slots for the same reason.
"""
import tensorflow as tf
import tf_keras as keras

BATCH_NORM_EPSILON = 1e-5

# depth -> (residual block class name, blocks per group); classes below.
BLOCKS_PER_GROUP = {
    18: ('ResidualBlock', (2, 2, 2, 2)),
    34: ('ResidualBlock', (3, 4, 6, 3)),
    50: ('BottleneckBlock', (3, 4, 6, 3)),
    101: ('BottleneckBlock', (3, 4, 23, 3)),
    152: ('BottleneckBlock', (3, 8, 36, 3)),
    200: ('BottleneckBlock', (3, 24, 36, 3)),
}
ENDPOINTS = ('initial_conv', 'initial_max_pool', 'block_group1',
             'block_group2', 'block_group3', 'block_group4', 'final_avg_pool')


def _conv_initializer():
  return keras.initializers.VarianceScaling()


class _FusedLocalStatistics:
  """Batch norm on the fused kernel when the statistics are local.

  Mixed into the two Keras batch-norm classes (`fused_batch_norm=True`).
  Where the statistics are the replica's own (unsynchronised layer, one
  replica in sync, or inference), the fused kernel computes the same
  normalisation up to float rounding, and faster: the unfused layer spends
  up to a third of a CPU step in reductions and float32 casts (README, Speed
  options: 1.07-1.5x the float32 step, 1.3x bfloat16 end to end). The moving
  averages are updated here from the biased batch variance, as the unfused
  layer does (Keras's own fused path averages the unbiased one). Several
  replicas of a synchronised layer take its all-reduce path.
  """

  def __init__(self, *args, fused_local=False, **kwargs):
    super().__init__(*args, **kwargs)
    self.fused_local = fused_local

  def call(self, inputs, training=None):
    # As Keras: a frozen (trainable=False) layer runs in inference mode.
    training = self._get_training_value(training)
    synchronised = (getattr(self, 'synchronized', False) and
                    tf.distribute.get_strategy().num_replicas_in_sync > 1)
    if (not self.fused_local or inputs.shape.rank != 4 or
        tf.is_tensor(training) or (training and synchronised)):
      return super().call(inputs, training=training)
    inputs = tf.cast(inputs, self.compute_dtype)
    channels = inputs.shape[-1]
    gamma = self.gamma if self.scale else tf.ones([channels])
    beta = self.beta if self.center else tf.zeros([channels])
    if not training:
      outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
          inputs, gamma, beta, mean=self.moving_mean,
          variance=self.moving_variance, epsilon=self.epsilon,
          is_training=False)
      return outputs
    outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
    # The kernel returns the unbiased (Bessel-corrected) batch variance.
    count = tf.cast(tf.size(inputs) // channels, tf.float32)
    variance *= (count - 1.) / tf.maximum(count, 1.)
    self._assign_moving_average(self.moving_mean, mean, self.momentum, None)
    self._assign_moving_average(self.moving_variance, variance, self.momentum,
                                None)
    return outputs


# Same class names as Keras's, so the same variable names
# (`sync_batch_normalization_<n>`, `batch_normalization_<n>`).
class SyncBatchNormalization(_FusedLocalStatistics,
                             keras.layers.experimental.SyncBatchNormalization):
  pass


class BatchNormalization(_FusedLocalStatistics,
                         keras.layers.BatchNormalization):
  pass


class BatchNormRelu(keras.layers.Layer):
  """Batch norm (cross-replica when `global_bn`), then an optional ReLU.

  With `init_zero` gamma starts at 0, so a residual branch ending here starts
  as the identity (Goyal et al. 2017). `fused`: see `_FusedLocalStatistics`.
  """

  def __init__(self, relu=True, init_zero=False, center=True, scale=True,
               global_bn=True, batch_norm_decay=0.9, fused=False, **kwargs):
    super().__init__(**kwargs)
    self.relu = relu
    bn_args = dict(
        axis=-1, momentum=batch_norm_decay, epsilon=BATCH_NORM_EPSILON,
        center=center, scale=scale,
        gamma_initializer='zeros' if init_zero else 'ones',
        fused_local=fused)
    if global_bn:
      # The experimental class (not BatchNormalization(synchronized=True))
      # because its variables are named `sync_batch_normalization*`, as in
      # the original, and the optimizers select variables by name.
      self.bn = SyncBatchNormalization(**bn_args)
    else:
      # fused=False: the unfused layer (what the original runs) unless
      # fused_local says otherwise.
      self.bn = BatchNormalization(fused=False, **bn_args)

  def call(self, inputs, training):
    outputs = self.bn(inputs, training=training)
    return tf.nn.relu(outputs) if self.relu else outputs


class DropBlock(keras.layers.Layer):
  """Slot of the original's DropBlock, which SimCLR never enables.

  The original builds these layers with `keep_prob=None`, where they return
  their input; they only take positions in the layer lists, which decide
  checkpoint keys (`conv_relu_dropblock_layers/3/...`).
  """

  def call(self, inputs, training):
    del training
    return inputs


class FixedPadding(keras.layers.Layer):
  """Pads H and W so a strided conv's output does not depend on input size."""

  def __init__(self, kernel_size, **kwargs):
    super().__init__(**kwargs)
    self.kernel_size = kernel_size

  def call(self, inputs, training):
    del training
    total = self.kernel_size - 1
    before, after = total // 2, total - total // 2
    return tf.pad(inputs, [[0, 0], [before, after], [before, after], [0, 0]])


class Conv2dFixedPadding(keras.layers.Layer):
  """Bias-free conv: SAME padding at stride 1, explicit padding otherwise."""

  def __init__(self, filters, kernel_size, strides, **kwargs):
    super().__init__(**kwargs)
    self.fixed_padding = (FixedPadding(kernel_size) if strides > 1 else None)
    self.conv2d = keras.layers.Conv2D(
        filters=int(filters), kernel_size=kernel_size, strides=strides,
        padding='SAME' if strides == 1 else 'VALID', use_bias=False,
        kernel_initializer=_conv_initializer())

  def call(self, inputs, training):
    if self.fixed_padding is not None:
      inputs = self.fixed_padding(inputs, training=training)
    return self.conv2d(inputs, training=training)


class IdentityLayer(keras.layers.Layer):
  """Marks an endpoint (`initial_conv`, `initial_max_pool`) by its name."""

  def call(self, inputs, training):
    del training
    return tf.identity(inputs)


class SK_Conv2D(keras.layers.Layer):  # pylint: disable=invalid-name
  """Selective-kernel 3x3 conv: two streams mixed by a learned soft gate."""

  def __init__(self, filters, strides, sk_ratio, bn_args, min_dim=32,
               **kwargs):
    super().__init__(**kwargs)
    # Both streams come from one conv with twice the filters, split in two.
    self.conv2d_fixed_padding = Conv2dFixedPadding(
        filters=2 * filters, kernel_size=3, strides=strides)
    self.batch_norm_relu = BatchNormRelu(**bn_args)
    mid_dim = max(int(filters * sk_ratio), min_dim)
    self.conv2d_0 = keras.layers.Conv2D(
        filters=mid_dim, kernel_size=1, strides=1, use_bias=False,
        kernel_initializer=_conv_initializer())
    self.batch_norm_relu_1 = BatchNormRelu(**bn_args)
    self.conv2d_1 = keras.layers.Conv2D(
        filters=2 * filters, kernel_size=1, strides=1, use_bias=False,
        kernel_initializer=_conv_initializer())

  def call(self, inputs, training):
    streams = self.conv2d_fixed_padding(inputs, training=training)
    streams = self.batch_norm_relu(streams, training=training)
    streams = tf.stack(tf.split(streams, 2, axis=-1))  # [2, B, H, W, C]
    pooled = tf.reduce_mean(tf.reduce_sum(streams, axis=0), [1, 2],
                            keepdims=True)
    gate = self.conv2d_0(pooled, training=training)
    gate = self.batch_norm_relu_1(gate, training=training)
    gate = self.conv2d_1(gate, training=training)
    gate = tf.nn.softmax(tf.stack(tf.split(gate, 2, axis=-1)), axis=0)
    return tf.reduce_sum(streams * gate, axis=0)


class SE_Layer(keras.layers.Layer):  # pylint: disable=invalid-name
  """Squeeze-excitation: channels rescaled by a gate of their global means."""

  def __init__(self, filters, se_ratio, **kwargs):
    super().__init__(**kwargs)
    conv_args = dict(kernel_size=[1, 1], strides=[1, 1], padding='same',
                     use_bias=True)
    self.se_reduce = keras.layers.Conv2D(
        max(1, int(filters * se_ratio)),
        kernel_initializer=_conv_initializer(), **conv_args)
    # Its width is the input's, known only in build().
    self.se_expand = keras.layers.Conv2D(
        None, kernel_initializer=_conv_initializer(), **conv_args)

  def build(self, input_shape):
    self.se_expand.filters = int(input_shape[-1])
    super().build(input_shape)

  def call(self, inputs, training):
    del training
    squeezed = tf.reduce_mean(inputs, [1, 2], keepdims=True)
    gate = self.se_expand(tf.nn.relu(self.se_reduce(squeezed)))
    return tf.sigmoid(gate) * inputs


def _projection_shortcut(filters, strides, resnet_d, bn_args):
  """Layers of a projection shortcut (1x1 conv + BN, ResNet-D when SK)."""
  layers = []
  if resnet_d:
    # Average-pool then a stride-1 conv, so no input pixel is skipped.
    if strides > 1:
      layers.append(FixedPadding(2))
    layers.append(keras.layers.AveragePooling2D(
        pool_size=2, strides=strides,
        padding='SAME' if strides == 1 else 'VALID'))
    layers.append(Conv2dFixedPadding(filters=filters, kernel_size=1,
                                     strides=1))
  else:
    layers.append(Conv2dFixedPadding(filters=filters, kernel_size=1,
                                     strides=strides))
  layers.append(BatchNormRelu(relu=False, **bn_args))
  return layers


class ResidualBlock(keras.layers.Layer):
  """Basic block (ResNet-18/34): two 3x3 convs. SK only changes the shortcut."""

  def __init__(self, filters, strides, use_projection, sk_ratio, se_ratio,
               bn_args, **kwargs):
    super().__init__(**kwargs)
    self.conv2d_bn_layers = []
    self.shortcut_layers = []
    self.se_ratio = se_ratio
    if use_projection:
      self.shortcut_layers.extend(
          _projection_shortcut(filters, strides, sk_ratio > 0, bn_args))
    self.conv2d_bn_layers.extend([
        Conv2dFixedPadding(filters=filters, kernel_size=3, strides=strides),
        BatchNormRelu(**bn_args),
        Conv2dFixedPadding(filters=filters, kernel_size=3, strides=1),
        BatchNormRelu(relu=False, init_zero=True, **bn_args),
    ])
    if se_ratio > 0:
      self.se_layer = SE_Layer(filters, se_ratio)

  def call(self, inputs, training):
    shortcut = inputs
    for layer in self.shortcut_layers:
      shortcut = layer(shortcut, training=training)
    for layer in self.conv2d_bn_layers:
      inputs = layer(inputs, training=training)
    if self.se_ratio > 0:
      inputs = self.se_layer(inputs, training=training)
    return tf.nn.relu(inputs + shortcut)


class BottleneckBlock(keras.layers.Layer):
  """Bottleneck block (ResNet-50+): 1x1, 3x3 (or SK), 1x1 to 4x filters."""

  def __init__(self, filters, strides, use_projection, sk_ratio, se_ratio,
               bn_args, **kwargs):
    super().__init__(**kwargs)
    self.projection_layers = []
    if use_projection:
      self.projection_layers.extend(
          _projection_shortcut(4 * filters, strides, sk_ratio > 0, bn_args))
    self.shortcut_dropblock = DropBlock()
    layers = [
        Conv2dFixedPadding(filters=filters, kernel_size=1, strides=1),
        BatchNormRelu(**bn_args),
        DropBlock(),
    ]
    if sk_ratio > 0:
      layers.append(SK_Conv2D(filters, strides, sk_ratio, bn_args))
    else:
      layers.append(Conv2dFixedPadding(filters=filters, kernel_size=3,
                                       strides=strides))
      layers.append(BatchNormRelu(**bn_args))
    layers.extend([
        DropBlock(),
        Conv2dFixedPadding(filters=4 * filters, kernel_size=1, strides=1),
        BatchNormRelu(relu=False, init_zero=True, **bn_args),
        DropBlock(),
    ])
    if se_ratio > 0:
      layers.append(SE_Layer(filters, se_ratio))
    self.conv_relu_dropblock_layers = layers

  def call(self, inputs, training):
    shortcut = inputs
    for layer in self.projection_layers:
      shortcut = layer(shortcut, training=training)
    shortcut = self.shortcut_dropblock(shortcut, training=training)
    for layer in self.conv_relu_dropblock_layers:
      inputs = layer(inputs, training=training)
    return tf.nn.relu(inputs + shortcut)


class BlockGroup(keras.layers.Layer):
  """A stage of blocks; the first one projects (always, as in the original)."""

  def __init__(self, filters, block_cls, blocks, strides, block_args,
               **kwargs):
    super().__init__(**kwargs)
    self.layers = [block_cls(filters, strides, use_projection=True,
                             **block_args)]
    for _ in range(1, blocks):
      self.layers.append(block_cls(filters, 1, use_projection=False,
                                   **block_args))

  def call(self, inputs, training):
    for layer in self.layers:
      inputs = layer(inputs, training=training)
    return tf.identity(inputs)


class Resnet(keras.layers.Layer):
  """The encoder: stem, four block groups, global average pool.

  Args (constructor):
    depth: 18, 34, 50, 101, 152 or 200.
    width_multiplier: channel multiplier (1, 2, 3, ...; fractions allowed
      when every channel count stays whole).
    cifar_stem: 3x3 stride-1 stem without max-pool (the original uses it when
      image_size <= 32).
    sk_ratio, se_ratio: selective kernels / squeeze-excitation (0 = off).
    global_bn, batch_norm_decay, fused_batch_norm: batch-norm settings
      (`fused_batch_norm`: see `_FusedLocalStatistics`).
    frozen_groups: -1 trains everything; k >= 0 freezes the stem and block
      groups 1..k and stops gradients below group k+1 (`fine_tune_after_block`
      in finetune mode). As in the original, frozen layers' BNs still use
      batch statistics when training=True and so update their moving averages.

  Calling it on [B, H, W, 3] gives the [B, C] representation; with
  `return_endpoints=True` it gives (representation, {endpoint: tensor}).
  """

  def __init__(self, depth, width_multiplier=1, cifar_stem=False, sk_ratio=0.,
               se_ratio=0., global_bn=True, batch_norm_decay=0.9,
               frozen_groups=-1, fused_batch_norm=False, **kwargs):
    super().__init__(**kwargs)
    if depth not in BLOCKS_PER_GROUP:
      raise ValueError(f'resnet_depth={depth}: expected one of '
                       f'{sorted(BLOCKS_PER_GROUP)}.')
    block_name, blocks = BLOCKS_PER_GROUP[depth]
    block_cls = {'ResidualBlock': ResidualBlock,
                 'BottleneckBlock': BottleneckBlock}[block_name]
    self.frozen_groups = frozen_groups
    bn_args = dict(global_bn=global_bn, batch_norm_decay=batch_norm_decay,
                   fused=fused_batch_norm)
    width = int(64 * width_multiplier)
    # `trainable=False` on the wrapping layer only: Keras then leaves its
    # variables out of trainable_variables while the inner BN layers stay
    # trainable and keep training-mode behaviour (the original's semantics).
    stem_trainable = frozen_groups < 0
    stem = []
    if cifar_stem:
      stem.append(Conv2dFixedPadding(width, 3, 1, trainable=stem_trainable))
      stem.append(IdentityLayer(name='initial_conv', trainable=stem_trainable))
      stem.append(BatchNormRelu(trainable=stem_trainable, **bn_args))
      stem.append(IdentityLayer(name='initial_max_pool',
                                trainable=stem_trainable))
    else:
      if sk_ratio > 0:  # ResNet-D deep stem: three 3x3 convs.
        for filters, strides in ((width // 2, 2), (width // 2, 1)):
          stem.append(Conv2dFixedPadding(filters, 3, strides,
                                         trainable=stem_trainable))
          stem.append(BatchNormRelu(trainable=stem_trainable, **bn_args))
        stem.append(Conv2dFixedPadding(width, 3, 1, trainable=stem_trainable))
      else:
        stem.append(Conv2dFixedPadding(width, 7, 2, trainable=stem_trainable))
      stem.append(IdentityLayer(name='initial_conv', trainable=stem_trainable))
      stem.append(BatchNormRelu(trainable=stem_trainable, **bn_args))
      stem.append(keras.layers.MaxPooling2D(
          pool_size=3, strides=2, padding='SAME', trainable=stem_trainable))
      stem.append(IdentityLayer(name='initial_max_pool',
                                trainable=stem_trainable))
    self.initial_conv_relu_max_pool = stem

    block_args = dict(sk_ratio=sk_ratio, se_ratio=se_ratio, bn_args=bn_args)
    self.block_groups = []
    for g, (multiple, strides) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
      self.block_groups.append(BlockGroup(
          filters=width * multiple, block_cls=block_cls, blocks=blocks[g],
          strides=strides, block_args=block_args,
          name=f'block_group{g + 1}', trainable=g + 1 > frozen_groups))

  def call(self, inputs, training, return_endpoints=False):
    endpoints = {}
    for layer in self.initial_conv_relu_max_pool:
      inputs = layer(inputs, training=training)
      if isinstance(layer, IdentityLayer):
        endpoints[layer.name] = inputs
    for g, group in enumerate(self.block_groups):
      if g == self.frozen_groups:
        inputs = tf.stop_gradient(inputs)
      inputs = group(inputs, training=training)
      endpoints[f'block_group{g + 1}'] = inputs
    if self.frozen_groups == len(self.block_groups):
      inputs = tf.stop_gradient(inputs)
    hiddens = tf.reduce_mean(inputs, [1, 2])
    endpoints['final_avg_pool'] = hiddens
    return (hiddens, endpoints) if return_endpoints else hiddens


def resnet(config):
  """The encoder described by `config` (a `config.Config`)."""
  frozen = (config.fine_tune_after_block
            if config.train_mode == 'finetune' else -1)
  return Resnet(
      depth=config.resnet_depth, width_multiplier=config.width_multiplier,
      cifar_stem=config.cifar_stem, sk_ratio=config.sk_ratio,
      se_ratio=config.se_ratio, global_bn=config.global_bn,
      batch_norm_decay=config.batch_norm_decay, frozen_groups=frozen,
      fused_batch_norm=config.use_fused_batch_norm)
