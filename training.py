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


def make_train_loop(strategy, replica_step, train_metrics, iterations,
                    summary_steps, report=None, learning_rate=None,
                    stop_flag=None, agree_on_stop=False,
                    summary_prefix='train/'):
  """Returns `train_loop(iterator, steps)`: up to `steps` training steps in
  one tf.function call, as the original's loop (a checkpoint interval per
  call: on a TPU the host returns rarely, so the call's length is
  throughput).

  Reports go on inside the call: every `summary_steps` steps (0: none
  inside) and after its last step, the means of `train_metrics` since the
  previous report are written to the default summary writer as
  `<summary_prefix><name>` (and `learning_rate(step - 1)`, the rate of the
  step just taken, as `learning_rate`), handed to `report(step, {name:
  value})` on the host (the progress line), and reset.

  Args:
    strategy: the distribution strategy; `replica_step(images, labels)` runs
      on each of its replicas per step and updates `train_metrics`.
    train_metrics: {name: keras.metrics.Mean}, created under the strategy.
    iterations: the optimizer's step counter.
    summary_steps: report every this many steps (by `iterations`).
    report: Python callable `report(step, values)`, or None.
    learning_rate: `fn(step) -> rate` to summarise, or None.
    stop_flag: a boolean tf.Variable; once True (set by a signal handler's
      thread, see run.StopRequest), the call ends before its next step.
    agree_on_stop: several workers: they all see a stop request at the same
      step (one scalar all-reduce per step).

  Returns:
    The function; it returns the last reported means {name: scalar}.
  """
  names = list(train_metrics)

  def stop_requested():
    if stop_flag is None:
      return tf.constant(False)
    if not agree_on_stop:
      return stop_flag.read_value()
    votes = strategy.experimental_distribute_values_from_function(
        lambda _: tf.cast(stop_flag.read_value(), tf.float32))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None) > 0

  def on_host(step, *values):
    report(int(step), dict(zip(names, (float(v) for v in values))))

  def flush():
    step = iterations.read_value()
    values = {name: metric.result() for name, metric in train_metrics.items()}
    with tf.name_scope(''):  # tags without the cond's scope
      for name, value in values.items():
        tf.summary.scalar(summary_prefix + name, value, step=step)
      if learning_rate is not None:
        tf.summary.scalar('learning_rate',
                          learning_rate(tf.cast(step - 1, tf.float32)),
                          step=step)
    if report is not None:
      tf.py_function(on_host, [step, *values.values()], [])
    for metric in train_metrics.values():
      for variable in metric.variables:
        variable.assign(tf.zeros_like(variable))
    return values

  @tf.function
  def train_loop(iterator, steps):
    last = {name: tf.constant(0.) for name in names}
    for _ in tf.range(steps):
      if stop_requested():
        break
      # The summaries' tags must not carry the loop's and conditions' name
      # scopes ('while/cond/train/...').
      with tf.name_scope(''):
        images, labels = next(iterator)
        strategy.run(replica_step, (images, labels))
        if summary_steps and iterations % summary_steps == 0:
          last = flush()
    if train_metrics[names[0]].count > 0:  # steps since the last report
      last = flush()
    return last

  return train_loop
