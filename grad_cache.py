"""Gradient-cached NT-Xent: the negatives of a large batch with the
activation memory of a small one (`--grad_cache_chunks=K`).

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup". Each replica's batch is split into K chunks:

1. Every chunk goes through the model without a gradient tape, so no
   activations are kept; only its projections are.
2. NT-Xent over all the projections of the batch (negatives from every
   replica, as without chunks) gives the gradient of the loss with respect
   to each projection: the cache.
3. Each chunk goes through the model again under a tape, and the
   gradient of sum(projections * cached gradient) (plus the chunk's share
   of the supervised head's loss and, once, the weight decay) is added up.

What is exact: the update equals that of one pass over the whole batch in
which batch norm normalises each chunk with the chunk's own statistics
(tests/test_grad_cache.py checks this to 1e-5 on one and two replicas);
without chunks batch norm would use the statistics of the whole batch
(with --global_bn, of every replica's chunk k together). The batch-norm
moving averages are updated once per chunk (K times per step, by the
second pass; the first pass leaves them as they were). The random blur is
drawn once per batch, before chunking, as without chunks. The price is a
second forward pass: about 1.3x the compute of a plain step.
"""
import tensorflow as tf

import metrics
import model as model_lib
import objective
import runtime


def _moving_statistics(model):
  return [v for v in model.non_trainable_variables
          if 'moving_mean' in v.name or 'moving_variance' in v.name]


def _in_order(tensor, after):
  """`tensor`, computed only once `after` (tensors) are: the chunks run one
  at a time, so only one chunk's activations are alive."""
  if not after:
    return tensor
  with tf.control_dependencies(after):
    return tf.identity(tensor)


def _add(total, grads):
  if total is None:
    return list(grads)
  return [a if b is None else b if a is None else a + b
          for a, b in zip(total, grads)]


def cached_gradients(model, features, labels, config, chunks, strategy=None,
                     optimizer=None):
  """The loss terms and gradients of one replica's pretraining batch,
  computed K chunks at a time.

  Args:
    model: a `model.Model` with `train_mode='pretrain'`.
    features: [B, H, W, 6] two views per example; B divisible by `chunks`.
    labels: [B, num_classes] one-hot (the linear head's, if any).
    config: the run's `Config`.
    chunks: K.
    strategy: for the negatives of every replica (inside `strategy.run`).
    optimizer: with mixed_float16, the loss-scale optimizer (the gradients
      are scaled and unscaled as in `runtime.make_step`).

  Returns:
    (terms, grads): terms as `training.compute_losses` (the contrastive
    ones over the whole batch, the supervised ones averaged over chunks);
    grads of `total_loss / replicas` for `model.trainable_variables`.
  """
  num_replicas = strategy.num_replicas_in_sync if strategy else 1
  variables = model.trainable_variables

  def scaled(loss):
    return runtime.scale_loss(optimizer, loss / num_replicas)

  features = model.blur_views(features)
  feature_chunks = tf.split(features, chunks, 0)
  label_chunks = tf.split(labels, chunks, 0)

  # 1. Projections of every chunk, no tape; the moving statistics are put
  # back afterwards, so that only the second pass updates them.
  statistics = _moving_statistics(model)
  saved = [tf.identity(v) for v in statistics]
  projections = []
  for chunk in feature_chunks:
    chunk = _in_order(chunk, projections[-1:] or saved)
    proj, _ = model(chunk, training=True, blurred=True)
    projections.append(tf.stop_gradient(proj))
  with tf.control_dependencies(projections):
    for variable, value in zip(statistics, saved):
      variable.assign(value)

  # 2. The loss of the whole batch and its gradient per projection. A chunk
  # gives [view 1; view 2] of its examples; the loss takes view 1 of every
  # example, then view 2.
  halves = [tf.split(p, 2, 0) for p in projections]
  hidden = tf.concat([h[0] for h in halves] + [h[1] for h in halves], 0)
  with tf.GradientTape() as tape:
    tape.watch(hidden)
    con_loss, logits_con, labels_con = objective.add_contrastive_loss(
        hidden, hidden_norm=config.hidden_norm,
        temperature=config.temperature, strategy=strategy)
    loss = scaled(con_loss)
  cache = tf.split(tape.gradient(loss, hidden), 2, 0)
  cache = [tf.concat(pair, 0) for pair in zip(tf.split(cache[0], chunks, 0),
                                              tf.split(cache[1], chunks, 0))]

  # 3. Each chunk again, with a tape, one after the other.
  terms = {'contrast_loss': con_loss,
           'contrast_acc': metrics.contrastive_accuracy(logits_con,
                                                        labels_con),
           'contrast_entropy': metrics.contrastive_entropy(logits_con)}
  total, supervised = None, []
  after = [tf.reduce_sum(c) for c in cache] + [
      v.read_value() for v in statistics]
  for k, (chunk, chunk_labels) in enumerate(zip(feature_chunks,
                                                label_chunks)):
    chunk = _in_order(chunk, after)
    with tf.GradientTape() as tape:
      proj, logits = model(chunk, training=True, blurred=True)
      surrogate = tf.reduce_sum(proj * cache[k])
      if logits is not None:
        sup_loss = objective.add_supervised_loss(
            tf.concat([chunk_labels, chunk_labels], 0), logits)
        acc = metrics.supervised_accuracy(
            tf.concat([chunk_labels, chunk_labels], 0), logits)
        supervised.append((sup_loss, acc))
        surrogate += scaled(sup_loss / chunks)
      if k == 0:
        weight_decay = model_lib.add_weight_decay(model, config)
        surrogate += scaled(weight_decay)
    grads = tape.gradient(surrogate, variables)
    total = _add(total, grads)
    after = [g for g in total if g is not None]
  loss = con_loss + weight_decay
  if supervised:
    terms['supervised_loss'] = tf.add_n([s for s, _ in supervised]) / chunks
    terms['supervised_acc'] = tf.add_n([a for _, a in supervised]) / chunks
    loss += terms['supervised_loss']
  terms['weight_decay'] = weight_decay
  terms['total_loss'] = loss
  return terms, runtime.unscale_gradients(optimizer, total)


def make_grad_cache_step(model, optimizer, config, strategy, chunks):
  """`step(features, labels) -> terms` as `runtime.make_step`, with the
  gradients of `cached_gradients`."""
  optimizer = runtime.with_loss_scaling(optimizer, config, strategy)

  def step(features, labels):
    terms, grads = cached_gradients(model, features, labels, config, chunks,
                                    strategy, optimizer)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return terms

  return step
