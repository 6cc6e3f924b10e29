"""One SimCLR training step: losses of a replica's batch and the update.

`run.py` wraps `make_train_step` in its loop; tests call it directly. The
loss arithmetic is the original's, so the same weights and batch give the
same losses and optimizer updates.
"""
import tensorflow as tf

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


def make_train_step(model, optimizer, config, strategy=None):
  """Returns `step(features, labels) -> loss terms`, run inside a replica.

  Each replica's loss is divided by the number of replicas because the
  optimizer sums gradients over replicas: N replicas of B/N examples then
  update like one replica of B examples.
  """
  num_replicas = strategy.num_replicas_in_sync if strategy else 1

  def forward_backward(features, labels):
    with tf.GradientTape() as tape:
      terms = compute_losses(model, features, labels, config, strategy)
      loss = terms['total_loss'] / num_replicas
    return terms, tape.gradient(loss, model.trainable_variables)

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
