"""One SimCLR training step: losses of a replica's batch and the update.

`run.py` wraps `make_train_step` in its loop; tests call it directly. The
loss arithmetic is the original's, so the same weights and batch give the
same losses and optimizer updates.
"""
import contextlib

import tensorflow as tf
import tf_keras as keras

import metrics
import model as model_lib
import objective


def compute_losses(model, features, labels, config, strategy=None):
  """Forward pass and every loss term for one replica's batch.

  Args:
    model: a `model.Model`.
    features: [B, H, W, 3 * views] images in [0, 1].
    labels: [B, num_classes] one-hot labels.
    config: the run's `Config`.
    strategy: the distribution strategy (negatives come from all replicas).

  Returns:
    {name: scalar}: `total_loss` (contrastive + supervised + weight decay,
    before any division by the number of replicas), `weight_decay`, and
    `contrast_loss`/`contrast_acc`/`contrast_entropy` and
    `supervised_loss`/`supervised_acc` when those heads are used.
  """
  proj_out, logits = model(features, training=True)
  terms = {}
  loss = tf.constant(0.)
  if proj_out is not None:
    con_loss, logits_con, labels_con = objective.add_contrastive_loss(
        proj_out, hidden_norm=config.hidden_norm,
        temperature=config.temperature, strategy=strategy)
    loss += con_loss
    terms['contrast_loss'] = con_loss
    terms['contrast_acc'] = metrics.contrastive_accuracy(logits_con,
                                                         labels_con)
    terms['contrast_entropy'] = metrics.contrastive_entropy(logits_con)
  if logits is not None:
    if config.train_mode == 'pretrain':
      labels = tf.concat([labels, labels], 0)  # one row per view
    sup_loss = objective.add_supervised_loss(labels=labels, logits=logits)
    loss += sup_loss
    terms['supervised_loss'] = sup_loss
    terms['supervised_acc'] = metrics.supervised_accuracy(labels, logits)
  weight_decay = model_lib.add_weight_decay(model, config)
  terms['weight_decay'] = weight_decay
  terms['total_loss'] = loss + weight_decay
  return terms


def with_loss_scaling(optimizer, config, strategy=None):
  """The optimizer a step applies its gradients with.

  For `precision='mixed_float16'`, a dynamic loss-scale wrapper: float16
  gradients of an unscaled loss underflow, so the loss is multiplied by a
  scale (2**15 at first), the gradients divided by it, and a step whose
  gradients are not finite is skipped and halves the scale (which doubles
  again after 2000 good steps). Slots and `iterations` stay `optimizer`'s, so
  checkpoints keep their keys; the scale itself is not checkpointed (after a
  resume it starts again and settles within a few skipped steps). Other
  precisions need no scaling (bfloat16 has float32's exponent range). An
  optimizer that already scales is returned as it is. Batch-norm moving
  statistics are updated by the forward pass, so a skipped step still
  updates them (as in Keras).
  """
  if (config.precision != 'mixed_float16' or
      isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)):
    return optimizer
  with strategy.scope() if strategy else contextlib.nullcontext():
    return keras.mixed_precision.LossScaleOptimizer(optimizer)


def scale_loss(optimizer, loss):
  """`loss` as differentiated: scaled for a loss-scale optimizer (inside the
  tape), unchanged otherwise."""
  if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
    return optimizer.get_scaled_loss(loss)
  return loss


def unscale_gradients(optimizer, grads):
  """Undoes `scale_loss` on the gradients."""
  if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
    return optimizer.get_unscaled_gradients(grads)
  return grads


def make_train_step(model, optimizer, config, strategy=None):
  """Returns `step(features, labels) -> loss terms`, run inside a replica.

  Each replica's loss is divided by the number of replicas because the
  optimizer sums gradients over replicas: N replicas of B/N examples then
  update like one replica of B examples. With mixed_float16 the loss is
  scaled (see `with_loss_scaling`).
  """
  num_replicas = strategy.num_replicas_in_sync if strategy else 1
  optimizer = with_loss_scaling(optimizer, config, strategy)

  def forward_backward(features, labels):
    with tf.GradientTape() as tape:
      terms = compute_losses(model, features, labels, config, strategy)
      loss = scale_loss(optimizer, terms['total_loss'] / num_replicas)
    grads = tape.gradient(loss, model.trainable_variables)
    return terms, unscale_gradients(optimizer, grads)

  on_tpu = isinstance(strategy, tf.distribute.TPUStrategy)
  if config.jit_compile and not on_tpu:
    # XLA fuses the forward and backward pass (TPUs compile everything
    # anyway). A nested tf.function cannot hold the cross-replica
    # synchronisation of sync batch norm and the NT-Xent negatives.
    if num_replicas > 1:
      raise ValueError(f'jit_compile=True with {num_replicas} replicas: XLA '
                       'compilation of the step needs one replica per process.')
    forward_backward = tf.function(forward_backward, jit_compile=True)

  def step(features, labels):
    terms, grads = forward_backward(features, labels)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return terms

  return step


def make_train_loop(strategy, replica_step):
  """A tf.function running `replica_step(images, labels)` on every replica
  for `steps` batches drawn from a distributed `iterator`: several steps per
  call, so the host returns only between reports."""

  @tf.function
  def train_loop(iterator, steps):
    for _ in tf.range(steps):
      images, labels = next(iterator)
      strategy.run(replica_step, (images, labels))

  return train_loop
