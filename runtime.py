"""The training runtime every mode uses: strategy and roles, restore or
initialise, the step plan, progress, stop requests, divergence, the update
of one step (`make_step`: gradients, loss scaling, XLA) and the one outer
loop (`train`).

A mode (pretraining and fine-tuning in training.py, distillation in
distill.py) builds its model, optimizer and step function (`make_step`),
then calls `train` with the names of the step's terms to report. `train`
owns everything between the first and the last step: the metrics, the
per-replica step, the training pipeline, resuming, the loop calls of a
checkpoint interval each, summaries and progress lines, SIGTERM/Ctrl-C, a
diverged loss, checkpoints written by the chief only, and the agreement of
several workers on when to stop.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Callable, Optional

from absl import logging
import tensorflow as tf
import tf_keras as keras

import checkpoints
import config as config_lib
import data as data_lib
import metrics
import model_dir_lock
import model as model_lib
import storage


class TrainingDiverged(RuntimeError):
  """The loss became non-finite; the message is one line for the user."""


class StopRequest:
  """Remembers SIGTERM/SIGINT (preemption, Ctrl-C) so the loop can save first.

  `flag` (a boolean variable) turns True the moment a signal arrives, also
  while the main thread is inside a long tf.function call (where Python's
  own handler waits for the call to return, and then only records which
  signal it was): the C-level handler writes to a wake-up socket that a
  watcher thread reads. The training loop reads the flag between steps
  (make_train_loop).
  """

  def __init__(self):
    self.signal = None
    self.flag = tf.Variable(False, trainable=False, name='stop_requested')
    self._previous = {}
    self._wakeup = None

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    self._wakeup = (reader, writer, signal.set_wakeup_fd(writer.fileno()))
    threading.Thread(target=self._watch, args=(reader,), daemon=True).start()
    return self

  def _watch(self, reader):
    while True:
      try:
        data = reader.recv(16)
      except OSError:
        return
      if not data or data == b'\0':  # closed, or asked to finish
        return
      if any(byte in (signal.SIGTERM, signal.SIGINT) for byte in data):
        self.flag.assign(True)

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  @property
  def requested(self):
    return self.signal is not None or bool(self.flag.numpy())

  def __exit__(self, *exc):
    reader, writer, previous_fd = self._wakeup
    signal.set_wakeup_fd(previous_fd)
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    try:
      writer.send(b'\0')
    except OSError:
      pass
    writer.close()
    reader.close()


def tf_config_names_workers():
  """Whether TF_CONFIG describes a multi-worker cluster."""
  try:
    cluster = json.loads(os.environ.get('TF_CONFIG') or '{}').get('cluster')
  except ValueError:
    raise config_lib.ConfigError(
        'TF_CONFIG is not valid JSON: expected e.g. {"cluster": {"worker": '
        '["host1:port", "host2:port"]}, "task": {"type": "worker", '
        '"index": 0}}.') from None
  return bool((cluster or {}).get('worker'))


def lost_worker_message(error, model_dir):
  """One line for a collective that failed because a worker went away."""
  text = str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  cause = next((line for line in lines if 'aborted by' in line),
               lines[0] if lines else type(error).__name__)
  # A failed connection names its remote target; the coordination service
  # lists the tasks that stopped sending heartbeats on the next line.
  peer = (re.search(r'remote target (/job:\S+?/task:\d+)', text) or
          re.search(r'unhealthy[^\n]*\n\s*(/job:\S+?/task:\d+)', text))
  who = peer.group(1) if peer else 'another worker'
  return (f'lost contact with {who} ({type(error).__name__}: {cause[:200]});'
          ' restart every worker with the same command: training resumes '
          f'from the last checkpoint in --model_dir={model_dir}.')


def build_strategy(cfg):
  """TPUStrategy, MirroredStrategy over GPUs, or the default strategy."""
  if cfg.use_tpu:
    try:
      if cfg.tpu_name:
        cluster = tf.distribute.cluster_resolver.TPUClusterResolver(
            cfg.tpu_name, zone=cfg.tpu_zone, project=cfg.gcp_project)
      else:
        cluster = tf.distribute.cluster_resolver.TPUClusterResolver(cfg.master)
      tf.config.experimental_connect_to_cluster(cluster)
      tf.tpu.experimental.initialize_tpu_system(cluster)
    except (ValueError, tf.errors.OpError, RuntimeError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise config_lib.ConfigError(
          f'--use_tpu=True (the default, as in the original) but no TPU was '
          f'found (tpu_name={cfg.tpu_name}, master={cfg.master}: {first}); '
          'pass --use_tpu=False to run on GPUs or the CPU.') from None
    return tf.distribute.TPUStrategy(cluster)
  if tf_config_names_workers():
    return tf.distribute.MultiWorkerMirroredStrategy()
  if tf.config.list_physical_devices('GPU'):
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def check_strategy(cfg, strategy):
  """Stops (ConfigError) on settings the strategy's replicas cannot run."""
  replicas = strategy.num_replicas_in_sync
  if cfg.jit_compile and replicas > 1 and not isinstance(
      strategy, tf.distribute.TPUStrategy):
    raise config_lib.ConfigError(
        f'--jit_compile with {replicas} replicas: XLA compilation of the '
        'step needs one replica per process (TPUs compile with XLA anyway).')
  for name in ('train_batch_size', 'eval_batch_size'):
    data_lib.check_divisible(getattr(cfg, name), replicas, f'--{name}')
  per_replica = cfg.train_batch_size // replicas
  if per_replica % cfg.grad_cache_chunks:
    raise config_lib.ConfigError(
        f'--grad_cache_chunks={cfg.grad_cache_chunks} does not divide the '
        f'{per_replica} examples per replica (--train_batch_size='
        f'{cfg.train_batch_size} over {replicas} replicas): use a divisor '
        f'of {per_replica}.')


def prepare(cfg):
  """What every training mode checks and sets up before any work; returns
  the strategy.

  Stops with one line (ConfigError, CheckpointError) when model_dir is
  missing or not writable (the chief's), `--checkpoint` is unreadable, or
  the replicas cannot run the settings (`check_strategy`); seeds Python's,
  NumPy's and TensorFlow's generators with `--seed` (Keras initialisers
  draw theirs from Python's).
  """
  if not cfg.model_dir:
    raise config_lib.ConfigError('--model_dir is required: where checkpoints '
                                 'and results go.')
  if cfg.checkpoint:
    checkpoints.check_checkpoint(cfg.checkpoint, cfg.use_ema_weights)
  strategy = build_strategy(cfg)
  logging.info('Running on %d replica(s) with %s',
               strategy.num_replicas_in_sync, type(strategy).__name__)
  check_strategy(cfg, strategy)
  if is_chief(strategy):
    # Only the chief writes to model_dir.
    check_writable(cfg.model_dir)
  if cfg.seed is not None:
    keras.utils.set_random_seed(cfg.seed)
  return strategy


def is_chief(strategy):
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not getattr(resolver, 'task_type', None):
    return True
  return resolver.task_type in ('chief', None) or (
      resolver.task_type == 'worker' and resolver.task_id == 0 and
      'chief' not in resolver.cluster_spec().as_dict())


def is_multi_worker(strategy):
  return data_lib.num_input_pipelines(strategy) > 1


@contextlib.contextmanager
def output_dir(cfg, strategy):
  """Where this process writes checkpoints and exports; enter it before any
  work.

  The chief writes to model_dir, which it holds for the run
  (`model_dir_lock`: a second run on it stops at once) unless this is
  `--mode=eval`, which follows a training run's checkpoints. The other
  workers of a multi-worker run must save too (saving reads synchronised
  variables, which takes every worker's part in a collective), so they
  write to a private temporary directory, removed when they finish.
  """
  if is_chief(strategy):
    if cfg.mode == 'eval':
      yield cfg.model_dir
    else:
      with model_dir_lock.held(cfg.model_dir):
        yield cfg.model_dir
    return
  path = tempfile.mkdtemp(prefix='simclr_worker_')
  logging.info('Not the chief: this worker saves to %s (removed at exit).',
               path)
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


def _sum_over_replicas(strategy, value):
  """`value` of this process summed over every replica of every worker (a
  collective: every worker must call it, in the same order)."""
  per_replica = strategy.experimental_distribute_values_from_function(
      lambda _: tf.constant(value, tf.float64))
  return float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                               axis=None))


def chief_decides(strategy, flag):
  """The chief's `flag` on every worker (the others' flags are ignored)."""
  if not is_multi_worker(strategy):
    return flag
  return _sum_over_replicas(strategy, float(bool(flag) and
                                            is_chief(strategy))) > 0


def any_worker(strategy, flag):
  """True on every worker if `flag` is True on any of them."""
  if not is_multi_worker(strategy):
    return flag
  return _sum_over_replicas(strategy, float(bool(flag))) > 0


def check_same_step(strategy, step, model_dir):
  """Stops every worker if they resumed from different checkpoints."""
  if not is_multi_worker(strategy):
    return
  total = _sum_over_replicas(strategy, float(step))
  replicas = strategy.num_replicas_in_sync
  if total != step * replicas:
    raise checkpoints.CheckpointError(
        f'the workers resumed at different steps (this one at step {step}, '
        f'the mean over replicas is {total / replicas:g}): --model_dir='
        f'{model_dir} must be one directory that every worker reads (a '
        'shared file system or gs://), not a local one per machine.')


def build_model(cfg, num_classes, strategy):
  """Creates the model and all its variables under `strategy`."""
  with strategy.scope(), model_lib.precision_policy(cfg.precision):
    model = model_lib.Model(num_classes, cfg)
    model(tf.zeros([1, cfg.image_size, cfg.image_size, 3]), training=False)
  return model


class Progress:
  """One console line per report: step, rate, time left."""

  def __init__(self, total_steps, batch_size, start_step):
    self.total, self.batch = total_steps, batch_size
    self.start_step, self.start = start_step, time.time()

  def line(self, step, terms):
    elapsed = time.time() - self.start
    done = step - self.start_step
    rate = done * self.batch / elapsed if elapsed > 0 else 0.
    left = (self.total - step) * elapsed / done if done else float('nan')
    shown = ' '.join(f'{k}={v:.4f}' for k, v in terms.items())
    return (f'step {step}/{self.total} | {rate:.1f} images/s | '
            f'{left / 60:.1f} min left | {shown}')


def _restore_problem(checkpoint, path):
  """None if `checkpoint` restored from `path`, else what went wrong."""
  if not tf.io.gfile.exists(path + '.index'):
    return 'listed in the checkpoint state file but its files are missing'
  try:
    checkpoint.restore(path).assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError, ValueError, IndexError) as e:
    first = (str(e).strip().splitlines() or [''])[0][:200]
    return f'unreadable ({type(e).__name__}: {first})'
  return None


def restore_or_initialise(cfg, model, manager):
  """Resumes from model_dir, else initialises from --checkpoint."""
  state = tf.train.get_checkpoint_state(cfg.model_dir)
  saved = list(state.all_model_checkpoint_paths) if state else []
  if state and state.model_checkpoint_path not in saved:
    saved.append(state.model_checkpoint_path)
  saved = [p if os.path.isabs(p) or '://' in p else
           os.path.join(cfg.model_dir, p) for p in saved]
  for path in reversed(saved):
    problem = _restore_problem(manager.checkpoint, path)
    if problem is None:
      logging.info('Resuming from %s', path)
      return
    if not cfg.resume_fallback:
      raise checkpoints.CheckpointError(
          f'cannot resume from {path}: {problem}; pass --resume_fallback to '
          'resume from the previous checkpoint instead.')
    logging.warning('Checkpoint %s is %s; falling back to the previous one.',
                    path, problem)
  if saved:
    raise checkpoints.CheckpointError(
        f'no readable checkpoint in {cfg.model_dir} (tried {len(saved)}); '
        'move the model_dir away to start afresh.')
  if cfg.checkpoint:
    checkpoints.restore_model(model, cfg.checkpoint, cfg.variable_schema,
                              use_ema=cfg.use_ema_weights)
    if cfg.zero_init_logits_layer and hasattr(model, 'supervised_head'):
      logging.info('Zero-initialising the supervised head')
      model.zero_supervised_head()
  elif cfg.train_mode == 'finetune':
    logging.warning('--train_mode=finetune without --checkpoint: training '
                    'from scratch (random initialisation).')


def step_plan(cfg, num_train_examples):
  """(train steps, checkpoint every, summaries every).

  One call of the training loop runs up to a checkpoint interval, as in the
  original (an epoch by default); summaries and progress lines come every
  `train_summary_steps` steps inside it (0: at the checkpoints only).
  """
  train_steps = model_lib.get_train_steps(num_train_examples, cfg)
  epoch_steps = int(round(num_train_examples / cfg.train_batch_size))
  checkpoint_steps = (cfg.checkpoint_steps or
                      max(1, cfg.checkpoint_epochs * epoch_steps))
  summary_steps = cfg.train_summary_steps or checkpoint_steps
  return train_steps, checkpoint_steps, summary_steps


def write_json(path, obj):
  """Writes `obj` as JSON to `path` atomically (gs:// works); a failed
  write leaves any earlier file and stops with storage.WriteFailed."""
  storage.write_or_stop(path, json.dumps(obj).encode(),
                        'the checkpoints are saved: free some space and '
                        'rerun the same command.')


def save_checkpoint(manager, step, model, optimizer):
  """`manager.save` at `step`. A failed write (a full disk) removes the
  partial checkpoint, so the previous one stays the latest, and stops with
  storage.WriteFailed."""
  try:
    return manager.save(checkpoint_number=step)
  except Exception as e:  # pylint: disable=broad-except
    if not storage.is_write_error(e):
      raise
    prefix = os.path.join(manager.directory, f'ckpt-{step}')
    storage.remove(prefix + '_temp')
    latest = tf.train.latest_checkpoint(manager.directory)
    if latest != prefix:  # not recorded: its files are partial
      for path in tf.io.gfile.glob(prefix + '.*'):
        storage.remove(path)
    slots = optimizer.variables
    needed = storage.nbytes(model.variables) + storage.nbytes(
        slots() if callable(slots) else slots)
    still = (f'the latest checkpoint is still {os.path.basename(latest)}'
             if latest else 'no checkpoint was written')
    raise storage.failed(
        f'checkpoint ckpt-{step}', manager.directory, e, needed,
        f'{still}: free some space and rerun the same command to resume.'
    ) from None


def check_writable(model_dir):
  """Creates model_dir and proves it writable, before any work."""
  probe = os.path.join(model_dir, '.write_test')
  try:
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(probe, 'w') as f:
      f.write('ok')
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise config_lib.ConfigError(
        f'--model_dir={model_dir} is not writable ({type(e).__name__}).'
    ) from None


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
      thread, see StopRequest), the call ends before its next step.
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


@dataclasses.dataclass
class Periodic:
  """A host task of a mode, every `steps` steps and at the last step (not
  after a stop request): `run(step, last)`, inside the run's summary
  writer. The loop's calls are shortened to end at its steps."""
  steps: int
  run: Callable[[int, bool], None]


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


def make_step(model, optimizer, config, strategy, loss_terms):
  """Returns `step(features, labels) -> loss terms`, run inside a replica.

  `loss_terms(features, labels)` computes {name: scalar} with `total_loss`
  (called inside the gradient tape; `labels` may be any structure); the
  step differentiates it with respect to the model's trainable variables
  and applies the update. Each replica's loss is divided by the number of
  replicas because the optimizer sums gradients over replicas: N replicas
  of B/N examples then update like one replica of B examples. With
  mixed_float16 the loss is scaled (see `with_loss_scaling`); with
  `config.jit_compile` the forward and backward pass are XLA-compiled (one
  replica per process: runtime.check_strategy). Every trainable variable
  goes to the optimizer, also those the loss does not reach (a projection
  head the classifier does not read: Keras skips them with a warning), as
  in the original: the optimizer numbers its slots (`optimizer/_variables/
  <i>` in checkpoints) in that order.
  """
  num_replicas = strategy.num_replicas_in_sync if strategy else 1
  optimizer = with_loss_scaling(optimizer, config, strategy)

  def forward_backward(features, labels):
    with tf.GradientTape() as tape:
      terms = loss_terms(features, labels)
      loss = scale_loss(optimizer, terms['total_loss'] / num_replicas)
    grads = tape.gradient(loss, model.trainable_variables)
    return terms, unscale_gradients(optimizer, grads)

  if config.jit_compile and not isinstance(strategy,
                                           tf.distribute.TPUStrategy):
    # XLA fuses the forward and backward pass (TPUs compile everything
    # anyway). A nested tf.function cannot hold the cross-replica
    # synchronisation of sync batch norm and the NT-Xent negatives, hence
    # one replica.
    forward_backward = tf.function(forward_backward, jit_compile=True)

  def step(features, labels):
    terms, grads = forward_backward(features, labels)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return terms

  return step


def train(cfg, strategy, model, optimizer, schedule, step_fn, metric_names,
          source, num_train_examples, out_dir, summary_prefix='train/',
          periodic: Optional[Periodic] = None):
  """The outer training loop of every mode; returns (CheckpointManager,
  finished).

  Args:
    cfg: the run's Config (steps, checkpoints, summaries, resume settings,
      the input pipeline's).
    strategy: from `prepare`; model and optimizer were created under its
      scope.
    model: the trained `model.Model`; with `optimizer` and its step counter
      it makes the checkpoint (the keys of the original's).
    schedule: the optimizer's learning rate as `fn(step)` (logged and
      summarised).
    step_fn: the mode's `step(images, one_hot_labels) -> {name: scalar}`,
      run on every replica (`make_step`).
    metric_names: the terms of `step_fn` to average, summarise and print.
    source: the training data (data.get_source), read with
      `cfg.train_split` and the training augmentation.
    num_train_examples: sets the step plan (epochs -> steps).
    out_dir: where this process saves (model_dir on the chief, see
      `output_dir`).
    summary_prefix: of the metrics' summary tags.
    periodic: a `Periodic` host task (the kNN monitor), or None.

  Restores from out_dir's latest checkpoint or initialises from
  `cfg.checkpoint`, then runs calls of up to a checkpoint interval until
  `train_steps` (see `make_train_loop`), saving at every checkpoint step,
  at the end, and at the step where SIGTERM/SIGINT stopped it (every worker
  at the same step). A non-finite loss stops it with `TrainingDiverged`
  before anything is saved after it. Summaries (the metrics, the learning
  rate and, every summary step, pairs of the augmented views) go to
  model_dir from the chief only. A resumed seeded run draws new batches
  (from the seed and the step) rather than replaying the first ones.
  """
  train_steps, checkpoint_steps, summary_steps = step_plan(
      cfg, num_train_examples)
  logging.info('# train examples: %d; # train_steps: %d; checkpoint every '
               '%d steps', num_train_examples, train_steps, checkpoint_steps)
  chief = is_chief(strategy)
  summary_writer = (tf.summary.create_file_writer(cfg.model_dir) if chief
                    else tf.summary.create_noop_writer())
  global_step = optimizer.iterations
  with strategy.scope():
    train_metrics = {name: keras.metrics.Mean(f'{summary_prefix}{name}')
                     for name in metric_names}
    checkpoint = tf.train.Checkpoint(
        model=model, global_step=global_step, optimizer=optimizer)
    # A non-chief worker's copies are only kept until it exits.
    manager = tf.train.CheckpointManager(
        checkpoint, directory=out_dir,
        max_to_keep=cfg.keep_checkpoint_max if chief else 1)
    restore_or_initialise(cfg, model, manager)

  step = int(global_step.numpy())
  check_same_step(strategy, step, cfg.model_dir)
  if step >= train_steps:
    logging.info('Training already complete at step %d (of %d).', step,
                 train_steps)
    return manager, True
  progress = Progress(train_steps, cfg.train_batch_size, step)

  def replica_step(images, labels):
    # Written before the step so it can overlap: what the model trains on
    # (view 1 next to view 2 when pretraining).
    with tf.summary.record_if(
        tf.equal((global_step + 1) % summary_steps, 0)):
      tf.summary.image('augmented_views', metrics.view_pairs(images),
                       step=global_step + 1, max_outputs=4)
    terms = step_fn(images, labels['labels'])
    for name, metric in train_metrics.items():
      metric.update_state(terms[name])

  def report(at_step, values):
    lr = float(schedule(tf.cast(at_step - 1, tf.float32)))
    logging.info('%s | lr=%.5f', progress.line(at_step, values), lr)

  iterator = iter(data_lib.build_distributed_dataset(
      source, cfg.train_batch_size, True, strategy,
      cfg.replace(seed=data_lib.resumed_seed(cfg.seed, step))))
  stopping = False
  with StopRequest() as stop:
    train_loop = make_train_loop(
        strategy, replica_step, train_metrics, global_step, summary_steps,
        report=report, learning_rate=schedule, stop_flag=stop.flag,
        agree_on_stop=is_multi_worker(strategy),
        summary_prefix=summary_prefix)
    while step < train_steps and not stopping:
      steps = min(train_steps - step,
                  checkpoint_steps - step % checkpoint_steps)
      if periodic is not None:
        steps = min(steps, periodic.steps - step % periodic.steps)
      with summary_writer.as_default():
        values = train_loop(iterator, tf.constant(steps))
      step = int(global_step.numpy())
      values = {name: float(value) for name, value in values.items()}
      if not all(math.isfinite(v) for v in values.values()):
        # Stop before the next save: no checkpoint holds the broken weights.
        shown = ', '.join(f'{k}={v:.4g}' for k, v in values.items())
        raise TrainingDiverged(
            f'non-finite loss by step {step} ({shown}); last good checkpoint: '
            f'{manager.latest_checkpoint or "none"}, nothing saved after it; '
            'lower --learning_rate or check the data.')
      # A signal to one worker stops them all, at the same step.
      stopping = any_worker(strategy, stop.requested)
      last = step >= train_steps
      if step % checkpoint_steps == 0 or last or stopping:
        save_checkpoint(manager, step, model, optimizer)
      if periodic is not None and not stopping and (
          step % periodic.steps == 0 or last):
        with summary_writer.as_default():
          periodic.run(step, last)
  summary_writer.flush()
  if stopping and step < train_steps:
    logging.info('Stopped by %s at step %d after saving; rerun the same '
                 'command to resume.',
                 f'signal {stop.signal}' if stop.signal else 'another worker',
                 step)
    return manager, False
  logging.info('Training complete at step %d.', step)
  return manager, True
