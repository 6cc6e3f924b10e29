"""Pretraining and fine-tuning: the SimCLR step, and the mode that trains,
evaluates and exports with it.

The step (`compute_losses`, `make_train_step`): the loss terms of one
replica's batch and the update, with the original's arithmetic, so the same
weights and batch give the same losses and optimizer updates; tests call it
directly. The mode (`run`, `train`, `evaluate`): what run.py's
--train_mode=pretrain|finetune runs, on the runtime's loop (runtime.py).
"""
import dataclasses
import os

from absl import logging
import tensorflow as tf
import tf_keras as keras

import config as config_lib
import data as data_lib
import export
import grad_cache
import knn_monitor
import metrics
import model as model_lib
import objective
import runtime


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
  """`make_step` with the SimCLR losses (`compute_losses`): pretraining or
  fine-tuning as `config.train_mode` says; pretraining with
  `grad_cache_chunks` > 1 computes them chunk by chunk (grad_cache.py)."""
  if config.grad_cache_chunks > 1:
    return grad_cache.make_grad_cache_step(model, optimizer, config,
                                           strategy,
                                           config.grad_cache_chunks)
  return runtime.make_step(
      model, optimizer, config, strategy,
      lambda features, labels: compute_losses(model, features, labels,
                                              config, strategy))


def run_knn_monitor(cfg, monitor, step):
  """Logs and returns the kNN monitor's top-1 accuracy at `step`."""
  knn = monitor.evaluate()
  logging.info('kNN monitor at step %d: top-1 %.4f (k=%d, T=%g; %d eval '
               'examples vs a bank of %d train examples; %.1f s)', step,
               knn.top_1_accuracy, cfg.knn_k, cfg.knn_temperature,
               knn.num_queries, knn.num_bank, knn.seconds)
  return knn.top_1_accuracy


def random_init_knn(cfg, source, strategy, trained):
  """The kNN accuracy of the run's architecture randomly initialised, as
  the run started when seeded (`runtime.prepare` seeds before the model is
  built), evaluated as the trained encoder's; logs both in one line."""
  if cfg.seed is not None:
    keras.utils.set_random_seed(cfg.seed)
  model = runtime.build_model(cfg, source.num_classes, strategy)
  accuracy = knn_monitor.KnnMonitor(
      source, strategy, cfg,
      lambda images: model.resnet_model(images, training=False),
  ).evaluate().top_1_accuracy
  logging.info('kNN top-1: %s %.3f, random init %.3f',
               'pretrained' if cfg.train_mode == 'pretrain' else 'fine-tuned',
               trained, accuracy)
  return accuracy


def train(cfg, source, strategy, model, num_train_examples, out_dir,
          monitor=None):
  """Pretrains or fine-tunes `model` on the runtime's loop; returns
  (CheckpointManager, finished) as `runtime.train`.

  Metrics are means over every replica of every worker. With a
  `knn_monitor.KnnMonitor`, its accuracy is logged and summarised every
  `cfg.knn_monitor_steps` steps and at the last step (unless the final
  evaluation of --mode=train_then_eval is about to report it).
  """
  with strategy.scope():
    schedule = model_lib.WarmUpAndCosineDecay(cfg.learning_rate,
                                              num_train_examples, cfg)
    optimizer = model_lib.build_optimizer(schedule, cfg)
  names = ['total_loss', 'weight_decay']
  if cfg.train_mode == 'pretrain':
    names += ['contrast_loss', 'contrast_acc', 'contrast_entropy']
  if cfg.has_supervised_head:
    names += ['supervised_loss', 'supervised_acc']
  periodic = None
  if monitor is not None:
    def knn(step, last):
      if last and cfg.mode == 'train_then_eval':
        return  # the final evaluation reports it
      tf.summary.scalar('eval/knn_top_1_accuracy',
                        run_knn_monitor(cfg, monitor, step), step=step)
    periodic = runtime.Periodic(cfg.knn_monitor_steps, knn)
  return runtime.train(
      cfg, strategy, model, optimizer, schedule,
      make_train_step(model, optimizer, cfg, strategy), names, source,
      num_train_examples, out_dir, periodic=periodic)


def evaluate(cfg, source, strategy, model, ckpt_path, num_eval_examples,
             out_dir, monitor=None):
  """Evaluates a checkpoint; writes results and a SavedModel.

  Results: top-1/top-5 of the supervised head over the eval split (the
  linear head trained while pretraining, or the fine-tuned classifier), and
  with a `knn_monitor.KnnMonitor` the kNN top-1 accuracy of the encoder.
  Every worker evaluates its share; the metrics are means over all of them
  and the chief alone writes results and summaries. The SavedModel goes to
  `out_dir` (see `output_dir`).
  """
  linear = cfg.has_supervised_head
  if not linear and monitor is None:
    logging.info('Skipping eval during pretraining without linear eval or '
                 'kNN monitor.')
    return None
  replicas = strategy.num_replicas_in_sync
  steps = cfg.eval_steps or data_lib.eval_steps(
      num_eval_examples, cfg.eval_batch_size, replicas,
      data_lib.num_input_pipelines(strategy))
  with strategy.scope():
    dataset = data_lib.build_distributed_dataset(
        source, cfg.eval_batch_size, False, strategy, cfg)
    top1 = keras.metrics.Mean('eval/label_top_1_accuracy')
    top5 = keras.metrics.Mean('eval/label_top_5_accuracy')
    reg_loss = keras.metrics.Mean('eval/regularization_loss')
    checkpoint = tf.train.Checkpoint(
        model=model, global_step=tf.Variable(0, dtype=tf.int64))
    checkpoint.restore(ckpt_path).expect_partial()
  global_step = int(checkpoint.global_step.numpy())
  logging.info('Evaluating %s at step %d over %d steps', ckpt_path,
               global_step, steps)

  def replica_step(images, labels):
    _, logits = model(images, training=False)
    onehot, mask = labels['labels'], labels['mask']
    truth = tf.argmax(onehot, 1)
    hit1 = tf.cast(tf.equal(tf.argmax(logits, 1), truth), tf.float32)
    hit5 = tf.cast(tf.math.in_top_k(truth, logits, 5), tf.float32)
    top1.update_state(hit1, sample_weight=mask)
    top5.update_state(hit5, sample_weight=mask)
    reg_loss.update_state(model_lib.add_weight_decay(model, cfg))

  @tf.function
  def eval_step(iterator):
    images, labels = next(iterator)
    strategy.run(replica_step, (images, labels))

  result = {}
  if linear:
    iterator = iter(dataset)
    for _ in range(steps):
      eval_step(iterator)
    result = {m.name: float(m.result()) for m in (reg_loss, top1, top5)}
  if monitor is not None:
    result['eval/knn_top_1_accuracy'] = run_knn_monitor(cfg, monitor,
                                                        global_step)
    if cfg.knn_random_init:
      result['eval/knn_top_1_accuracy_random_init'] = random_init_knn(
          cfg, source, strategy, result['eval/knn_top_1_accuracy'])
  result['global_step'] = global_step
  logging.info('Eval results: %s', result)
  if runtime.is_chief(strategy):
    writer = tf.summary.create_file_writer(cfg.model_dir)
    with writer.as_default():
      for name, value in result.items():
        if name != 'global_step':
          tf.summary.scalar(name, value, step=global_step)
    writer.flush()
    for name in ('result.json', f'result_{global_step}.json'):
      runtime.write_json(os.path.join(cfg.model_dir, name), result)
    # The Config this run used (its fields are the flags' names).
    runtime.write_json(os.path.join(cfg.model_dir, 'flags.json'),
                       dataclasses.asdict(cfg))
  export.export_and_rotate(model, out_dir, global_step,
                           cfg.keep_hub_module_max)
  return result


def run(cfg):
  """Pretraining or fine-tuning (`cfg.train_mode`): runs `cfg.mode`
  (train, eval or train_then_eval) for the run `cfg` describes; returns the
  evaluation result or None."""
  source = data_lib.source_for(cfg)
  data_lib.check_labelled(source, cfg)
  num_train = source.num_examples(cfg.train_split)
  num_eval = (source.num_examples(cfg.eval_split)  # fails early if absent
              if cfg.mode != 'train' or cfg.knn_monitor_steps else 0)
  if cfg.mode == 'eval' and runtime.tf_config_names_workers():
    # Each worker would follow model_dir's checkpoints on its own timing.
    raise config_lib.ConfigError(
        '--mode=eval with several workers is not supported: run it in one '
        'process, without TF_CONFIG (or use --mode=train_then_eval).')
  strategy = runtime.prepare(cfg)
  with runtime.output_dir(cfg, strategy) as out_dir:
    if runtime.is_chief(strategy) and cfg.dataset.startswith(
        data_lib.FOLDER_PREFIX):
      source.write_class_names(cfg.model_dir)
    model = runtime.build_model(cfg, source.num_classes, strategy)
    return _run_mode(cfg, source, strategy, model, num_train, num_eval,
                     out_dir)


def _run_mode(cfg, source, strategy, model, num_train, num_eval, out_dir):
  train_steps = model_lib.get_train_steps(num_train, cfg)
  monitor = None
  if cfg.knn_monitor_steps:
    monitor = knn_monitor.KnnMonitor(
        source, strategy, cfg,
        lambda images: model.resnet_model(images, training=False))
  if cfg.mode == 'eval':
    result = None
    for ckpt in tf.train.checkpoints_iterator(cfg.model_dir,
                                              min_interval_secs=15):
      result = evaluate(cfg, source, strategy, model, ckpt, num_eval, out_dir,
                        monitor)
      if result is None or result['global_step'] >= train_steps:
        logging.info('Eval complete.')
        return result
    return result
  manager, finished = train(cfg, source, strategy, model, num_train, out_dir,
                            monitor)
  if not finished:
    return None
  # A non-chief worker that found training complete saved nothing itself;
  # model_dir is then not being written.
  latest = manager.latest_checkpoint or tf.train.latest_checkpoint(
      cfg.model_dir)
  if cfg.mode == 'train_then_eval':
    # Evaluation exports the SavedModel of the evaluated checkpoint.
    return evaluate(cfg, source, strategy, model, latest, num_eval, out_dir,
                    monitor)
  step = int(latest.rsplit('-', 1)[1])
  exported = os.path.join(cfg.model_dir, 'saved_model', str(step))
  # Every worker exports (to out_dir), as the chief decides.
  if runtime.chief_decides(strategy, not tf.io.gfile.exists(exported)):
    export.export_and_rotate(model, out_dir, step, cfg.keep_hub_module_max)
  return None
