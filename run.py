r"""SimCLR command line: pretrain, finetune, linear eval, eval, export,
distillation and checkpoint conversion.

    python run.py --train_mode=pretrain --dataset=shapes10 --use_tpu=False \
        --resnet_depth=18 --image_size=32 --train_batch_size=128 \
        --train_epochs=10 --model_dir=/tmp/simclr
    python run.py --train_mode=distill --teacher=<SavedModel> ...  # distill.py
    python run.py --mode=convert --checkpoint=<any> --model_dir=<out> ...
                                                    # convert_checkpoint.py

Flags keep the original TF2 run.py's names, defaults and meanings (plus the
TF1 README's `--train_summary_steps` and `--variable_schema`). This is the
only module that reads FLAGS: it builds a frozen `config.Config` and passes it
down.
"""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf
import tf_keras as keras

import checkpoints
import config as config_lib
import convert_checkpoint
import data as data_lib
import export
import knn_monitor
import metrics
import model as model_lib
import training

FLAGS = flags.FLAGS
_D = config_lib.Config()  # defaults come from the Config, defined once

flags.DEFINE_float('learning_rate', _D.learning_rate,
                   'Initial learning rate per batch size of 256.')
flags.DEFINE_enum('learning_rate_scaling', _D.learning_rate_scaling,
                  ['linear', 'sqrt'],
                  'How to scale the learning rate as a function of batch size.')
flags.DEFINE_float('warmup_epochs', _D.warmup_epochs,
                   'Number of epochs of warmup.')
flags.DEFINE_float('weight_decay', _D.weight_decay, 'Amount of weight decay.')
flags.DEFINE_float('batch_norm_decay', _D.batch_norm_decay,
                   'Batch norm decay parameter.')
flags.DEFINE_integer('train_batch_size', _D.train_batch_size,
                     'Batch size for training.')
flags.DEFINE_string('train_split', _D.train_split, 'Split for training.')
flags.DEFINE_integer('train_epochs', _D.train_epochs,
                     'Number of epochs to train for.')
flags.DEFINE_integer('train_steps', _D.train_steps,
                     'Number of steps to train for. If provided, overrides '
                     'train_epochs.')
flags.DEFINE_integer('eval_steps', _D.eval_steps,
                     'Number of steps to eval for. If not provided, evals over '
                     'the entire dataset.')
flags.DEFINE_integer('eval_batch_size', _D.eval_batch_size,
                     'Batch size for eval.')
flags.DEFINE_integer('checkpoint_epochs', _D.checkpoint_epochs,
                     'Number of epochs between checkpoints/summaries.')
flags.DEFINE_integer('checkpoint_steps', _D.checkpoint_steps,
                     'Number of steps between checkpoints/summaries. If '
                     'provided, overrides checkpoint_epochs.')
flags.DEFINE_string('eval_split', _D.eval_split, 'Split for evaluation.')
flags.DEFINE_string('dataset', _D.dataset,
                    'Name of a TFDS dataset, shapes10 (the embedded dataset) '
                    'or folder:/path/to/root for your own images.')
flags.DEFINE_bool('cache_dataset', _D.cache_dataset,
                  'Whether to cache the entire dataset in memory. If the '
                  'dataset is ImageNet, this is a very bad idea, but for '
                  'smaller datasets it can improve performance.')
# 'convert' and 'distill' are new here (see the end of the file).
flags.DEFINE_enum('mode', _D.mode, [*config_lib.MODES, 'convert'],
                  'Whether to perform training or evaluation; convert: '
                  'write --checkpoint (any format) to --model_dir as a TF2 '
                  'checkpoint and a released-format SavedModel.')
flags.DEFINE_enum('train_mode', _D.train_mode,
                  [*config_lib.TRAIN_MODES, 'distill'],
                  'The train mode controls different objectives and trainable '
                  'components; distill: SimCLRv2 distillation of --teacher '
                  'into the model described by the model flags.')
flags.DEFINE_bool('lineareval_while_pretraining',
                  _D.lineareval_while_pretraining,
                  'Whether to finetune supervised head while pretraining.')
flags.DEFINE_string('checkpoint', _D.checkpoint,
                    'Loading from the given checkpoint for fine-tuning if a '
                    'finetuning checkpoint does not already exist in '
                    'model_dir.')
flags.DEFINE_bool('zero_init_logits_layer', _D.zero_init_logits_layer,
                  'If True, zero initialize layers after avg_pool for '
                  'supervised learning.')
flags.DEFINE_integer('fine_tune_after_block', _D.fine_tune_after_block,
                     'The layers after which block that we will fine-tune. -1 '
                     'means fine-tuning everything. 0 means fine-tuning after '
                     'stem block. 4 means fine-tuning just the linear head.')
flags.DEFINE_enum('linear_eval_protocol', _D.linear_eval_protocol,
                  list(config_lib.LINEAR_EVAL_PROTOCOLS),
                  'Batch norm of a frozen encoder (--fine_tune_after_block=4, '
                  'linear evaluation): tf2 as the original TF2 code (batch '
                  'statistics; the moving averages follow the data), tf1 as '
                  'the original TF1 code, whose figures the README quotes '
                  '(inference mode: the encoder is left bit-unchanged).')
flags.DEFINE_string('master', _D.master,
                    'Address/name of the TensorFlow master to use. By '
                    'default, use an in-process master.')
flags.DEFINE_string('model_dir', _D.model_dir,
                    'Model directory for training.')
flags.DEFINE_string('data_dir', _D.data_dir,
                    'Directory where dataset is stored.')
flags.DEFINE_bool('use_tpu', _D.use_tpu, 'Whether to run on TPU.')
flags.DEFINE_string('tpu_name', _D.tpu_name,
                    'The Cloud TPU to use for training. This should be either '
                    'the name used when creating the Cloud TPU, or a '
                    'grpc://ip.address.of.tpu:8470 url.')
flags.DEFINE_string('tpu_zone', _D.tpu_zone,
                    '[Optional] GCE zone where the Cloud TPU is located in.')
flags.DEFINE_string('gcp_project', _D.gcp_project,
                    '[Optional] Project name for the Cloud TPU-enabled '
                    'project.')
flags.DEFINE_enum('optimizer', _D.optimizer, ['momentum', 'adam', 'lars'],
                  'Optimizer to use.')
flags.DEFINE_float('momentum', _D.momentum, 'Momentum parameter.')
flags.DEFINE_string('eval_name', _D.eval_name, 'Name for eval.')
flags.DEFINE_integer('keep_checkpoint_max', _D.keep_checkpoint_max,
                     'Maximum number of checkpoints to keep.')
flags.DEFINE_integer('keep_hub_module_max', _D.keep_hub_module_max,
                     'Maximum number of Hub modules to keep.')
flags.DEFINE_float('temperature', _D.temperature,
                   'Temperature parameter for contrastive loss.')
flags.DEFINE_boolean('hidden_norm', _D.hidden_norm,
                     'Temperature parameter for contrastive loss.')
flags.DEFINE_enum('proj_head_mode', _D.proj_head_mode,
                  ['none', 'linear', 'nonlinear'],
                  'How the head projection is done.')
flags.DEFINE_integer('proj_out_dim', _D.proj_out_dim,
                     'Number of head projection dimension.')
flags.DEFINE_integer('num_proj_layers', _D.num_proj_layers,
                     'Number of non-linear head layers.')
flags.DEFINE_integer('ft_proj_selector', _D.ft_proj_selector,
                     'Which layer of the projection head to use during '
                     'fine-tuning. 0 means no projection head, and -1 means '
                     'the final layer.')
flags.DEFINE_boolean('global_bn', _D.global_bn,
                     'Whether to aggregate BN statistics across distributed '
                     'cores.')
# An integer in the original; a float here so narrow models (0.5, 0.125:
# 64 * width must be whole) can be built from the command line too.
flags.DEFINE_float('width_multiplier', _D.width_multiplier,
                   'Multiplier to change width of network.')
flags.DEFINE_integer('resnet_depth', _D.resnet_depth, 'Depth of ResNet.')
flags.DEFINE_float('sk_ratio', _D.sk_ratio,
                   'If it is bigger than 0, it will enable SK. Recommendation: '
                   '0.0625.')
flags.DEFINE_float('se_ratio', _D.se_ratio,
                   'If it is bigger than 0, it will enable SE.')
flags.DEFINE_integer('image_size', _D.image_size, 'Input image size.')
flags.DEFINE_float('color_jitter_strength', _D.color_jitter_strength,
                   'The strength of color jittering.')
flags.DEFINE_boolean('use_blur', _D.use_blur,
                     'Whether or not to use Gaussian blur for augmentation '
                     'during pretraining.')
# From the TF1 README's commands.
flags.DEFINE_integer('train_summary_steps', _D.train_summary_steps,
                     'Steps between training summaries and progress lines '
                     '(0: at checkpoints only).')
flags.DEFINE_string('variable_schema', _D.variable_schema,
                    'Regex over variable names: what --checkpoint restores, '
                    "e.g. '(?!global_step|(?:.*/|^)Momentum|head)'.")
# New here.
flags.DEFINE_bool('use_ema_weights', _D.use_ema_weights,
                  'With a released TF1 --checkpoint: restore its ema_model/ '
                  '(exponential moving average) weights.')
flags.DEFINE_enum('precision', _D.precision, list(config_lib.PRECISIONS),
                  'Keras precision policy of the layers: float32 (as the '
                  'original), mixed_bfloat16 (bfloat16 compute; variables, '
                  'loss and batch-norm statistics in float32: TPUs, CPUs with '
                  'BF16) or mixed_float16 (float16 compute with dynamic loss '
                  'scaling: GPUs).')
flags.DEFINE_bool('fused_batch_norm', _D.fused_batch_norm,
                  'Batch norm on the fused kernel where its statistics are '
                  'local (one replica, or --global_bn=False): 1.07-1.5x the '
                  'float32 step on CPU; equal up to float rounding. Unset: on '
                  'with mixed precision, off with float32 (the original\'s '
                  'arithmetic).')
flags.DEFINE_bool('jit_compile', _D.jit_compile,
                  'Compile the forward and backward pass with XLA (one '
                  'replica per process; off by default: slower on CPU).')
flags.DEFINE_bool('resume_fallback', _D.resume_fallback,
                  'If the latest checkpoint in model_dir is unreadable, '
                  'resume from the newest readable earlier one instead of '
                  'stopping.')
flags.DEFINE_bool('batched_augmentation', _D.batched_augmentation,
                  'Augment training images a whole batch at a time when they '
                  'share one size of at most '
                  f'{data_lib.BATCHED_AUGMENTATION_MAX_SIZE} px (same '
                  'operations as per image, up to float rounding; faster).')
flags.DEFINE_enum('on_corrupt', _D.on_corrupt, ['fail', 'skip'],
                  'Image folders: stop at an unreadable image, or skip it '
                  '(each one is logged).')
flags.DEFINE_integer('knn_monitor_steps', _D.knn_monitor_steps,
                     'Steps between kNN monitor evaluations while training '
                     '(0: off): weighted k-NN top-1 accuracy of the encoder\'s '
                     'final_avg_pool features on --eval_split against a bank '
                     'of --train_split features, logged and written to '
                     'TensorBoard as eval/knn_top_1_accuracy; when on, the '
                     'final evaluation reports it too.')
flags.DEFINE_integer('knn_bank_size', _D.knn_bank_size,
                     'kNN monitor: how many train examples (the first ones '
                     'of --train_split, eval preprocessing) form the feature '
                     'bank; 0: all of them.')
flags.DEFINE_integer('knn_k', _D.knn_k, 'kNN monitor: neighbours that vote.')
flags.DEFINE_float('knn_temperature', _D.knn_temperature,
                   'kNN monitor: temperature T of the votes exp(cos / T).')
# Distillation (--train_mode=distill, distill.py).
flags.DEFINE_string('teacher', None, 'Distillation: SavedModel of the '
                    'fine-tuned teacher (released format, with logits_sup; '
                    'gs:// works).')
flags.DEFINE_float('distill_temperature', 1.0,
                   'Distillation: tau; teacher and student logits are divided '
                   'by it before the softmax of the distillation term.')
flags.DEFINE_float('distill_alpha', 1.0,
                   'Distillation: weight of the distillation term; 1 - alpha '
                   'weighs the cross entropy with the dataset labels (needs a '
                   "teacher with the dataset's classes). 1: labels unused.")
# Conversion (--mode=convert, convert_checkpoint.py).
flags.DEFINE_float('kernel_scale', 1.0,
                   'Conversion: multiply the encoder conv kernels that feed a '
                   "batch norm by this (and that batch norm's moving "
                   'statistics to match), e.g. 0.06 to bring SimCLRv1 weights '
                   'to the scale of SimCLRv2 ones for fine-tuning with '
                   '--optimizer=momentum.')
flags.DEFINE_float('convert_tolerance', 1e-4,
                   'Conversion: largest output difference accepted, relative '
                   'to the output scale.')
flags.DEFINE_integer('seed', _D.seed,
                     'Seed of the input pipelines (shuffling, augmentations) '
                     'and the initialisation, for reproducible runs; unset: '
                     'unseeded, as the original.')


class TrainingDiverged(RuntimeError):
  """The loss became non-finite; the message is one line for the user."""


class StopRequest:
  """Remembers SIGTERM/SIGINT (preemption, Ctrl-C) so the loop can save first.

  `flag` (a boolean variable) turns True the moment a signal arrives, also
  while the main thread is inside a long tf.function call (where Python's
  own handlers wait for the call to return): the C-level handler writes to
  a wake-up socket that a watcher thread reads. The training loop reads the
  flag between steps (training.make_train_loop).
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
    self.flag.assign(True)

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


def config_from_flags(**overrides):
  """The frozen Config of this run, validated (ConfigError on bad values)."""
  fields = config_lib.Config.__dataclass_fields__
  values = {name: FLAGS[name].value for name in fields if name in FLAGS}
  values.update(overrides)
  return config_lib.Config(**values).validate()


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
  """Where this process writes checkpoints and exports.

  The chief writes to model_dir. The other workers of a multi-worker run
  must save too (saving reads synchronised variables, which takes every
  worker's part in a collective), so they write to a private temporary
  directory, removed when they finish.
  """
  if is_chief(strategy):
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


def run_knn_monitor(cfg, monitor, step):
  """Logs and returns the kNN monitor's top-1 accuracy at `step`."""
  knn = monitor.evaluate()
  logging.info('kNN monitor at step %d: top-1 %.4f (k=%d, T=%g; %d eval '
               'examples vs a bank of %d train examples; %.1f s)', step,
               knn.top_1_accuracy, cfg.knn_k, cfg.knn_temperature,
               knn.num_queries, knn.num_bank, knn.seconds)
  return knn.top_1_accuracy


def train(cfg, source, strategy, model, num_train_examples, out_dir,
          monitor=None):
  """The training loop; returns (CheckpointManager, finished).

  Checkpoints go to `out_dir` (see `output_dir`); summaries are written by
  the chief only. Metrics are means over every replica of every worker.
  With a `knn_monitor.KnnMonitor`, its accuracy is logged and summarised
  every `cfg.knn_monitor_steps` steps and at the last step (unless the final
  evaluation of --mode=train_then_eval is about to report it).
  """
  train_steps, checkpoint_steps, summary_steps = step_plan(
      cfg, num_train_examples)
  logging.info('# train examples: %d; # train_steps: %d; checkpoint every '
               '%d steps', num_train_examples, train_steps, checkpoint_steps)
  chief = is_chief(strategy)
  summary_writer = (tf.summary.create_file_writer(cfg.model_dir) if chief
                    else tf.summary.create_noop_writer())
  with strategy.scope():
    schedule = model_lib.WarmUpAndCosineDecay(cfg.learning_rate,
                                              num_train_examples, cfg)
    optimizer = model_lib.build_optimizer(schedule, cfg)
    names = ['total_loss', 'weight_decay']
    if cfg.train_mode == 'pretrain':
      names += ['contrast_loss', 'contrast_acc', 'contrast_entropy']
    if cfg.has_supervised_head:
      names += ['supervised_loss', 'supervised_acc']
    train_metrics = {n: keras.metrics.Mean(f'train/{n}') for n in names}
    checkpoint = tf.train.Checkpoint(
        model=model, global_step=optimizer.iterations, optimizer=optimizer)
    # A non-chief worker's copies are only kept until it exits.
    manager = tf.train.CheckpointManager(
        checkpoint, directory=out_dir,
        max_to_keep=cfg.keep_checkpoint_max if chief else 1)
    restore_or_initialise(cfg, model, manager)

  step_fn = training.make_train_step(model, optimizer, cfg, strategy)

  def replica_step(images, labels):
    # Written before the step so it can overlap; what the model trains on,
    # view 1 next to view 2 for pretraining.
    record = tf.equal((optimizer.iterations + 1) % summary_steps, 0)
    with tf.summary.record_if(record):
      tf.summary.image('augmented_views', metrics.view_pairs(images),
                       step=optimizer.iterations + 1, max_outputs=4)
    terms = step_fn(images, labels['labels'])
    for name, metric in train_metrics.items():
      metric.update_state(terms[name])

  global_step = optimizer.iterations
  step = int(global_step.numpy())
  check_same_step(strategy, step, cfg.model_dir)
  if step >= train_steps:
    logging.info('Training already complete at step %d (of %d).', step,
                 train_steps)
    return manager, True
  # A resumed seeded run draws new batches (from the seed and the step)
  # rather than replaying those of the first steps.
  dataset = data_lib.build_distributed_dataset(
      source, cfg.train_batch_size, True, strategy,
      cfg.replace(seed=data_lib.resumed_seed(cfg.seed, step)))
  progress = Progress(train_steps, cfg.train_batch_size, step)

  def report(at_step, values):
    lr = float(schedule(tf.cast(at_step - 1, tf.float32)))
    logging.info('%s | lr=%.5f', progress.line(at_step, values), lr)

  iterator = iter(dataset)
  stopping = False
  with StopRequest() as stop:
    train_loop = training.make_train_loop(
        strategy, replica_step, train_metrics, global_step, summary_steps,
        report=report, learning_rate=schedule, stop_flag=stop.flag,
        agree_on_stop=is_multi_worker(strategy))
    while step < train_steps and not stopping:
      steps = min(train_steps - step,
                  checkpoint_steps - step % checkpoint_steps)
      if monitor is not None:
        steps = min(steps, cfg.knn_monitor_steps -
                    step % cfg.knn_monitor_steps)
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
      if (step % checkpoint_steps == 0 or step >= train_steps or stopping):
        manager.save(checkpoint_number=step)
      last = step >= train_steps
      if (monitor is not None and not stopping and
          (step % cfg.knn_monitor_steps == 0 or last) and
          not (last and cfg.mode == 'train_then_eval')):
        accuracy = run_knn_monitor(cfg, monitor, step)
        with summary_writer.as_default():
          tf.summary.scalar('eval/knn_top_1_accuracy', accuracy, step=step)
  summary_writer.flush()
  if stopping and step < train_steps:
    logging.info('Stopped by %s at step %d after saving; rerun the same '
                 'command to resume.',
                 f'signal {stop.signal}' if stop.signal else 'another worker',
                 step)
    return manager, False
  logging.info('Training complete at step %d.', step)
  return manager, True


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
  result['global_step'] = global_step
  logging.info('Eval results: %s', result)
  if is_chief(strategy):
    writer = tf.summary.create_file_writer(cfg.model_dir)
    with writer.as_default():
      for name, value in result.items():
        if name != 'global_step':
          tf.summary.scalar(name, value, step=global_step)
    writer.flush()
    for name in ('result.json', f'result_{global_step}.json'):
      _write_json(os.path.join(cfg.model_dir, name), result)
    _write_json(os.path.join(cfg.model_dir, 'flags.json'),
                {k: v for k, v in FLAGS.flag_values_dict().items()
                 if _json_serializable(v)})
  export.export_and_rotate(model, out_dir, global_step,
                           cfg.keep_hub_module_max)
  return result


def _json_serializable(value):
  try:
    json.dumps(value)
    return True
  except TypeError:
    return False


def _write_json(path, obj):
  with tf.io.gfile.GFile(path + '.tmp', 'w') as f:
    json.dump(obj, f)
  tf.io.gfile.rename(path + '.tmp', path, overwrite=True)


def _check_writable(model_dir):
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


def run(cfg):
  """Runs `cfg.mode` for the run described by `cfg`."""
  if not cfg.model_dir:
    raise config_lib.ConfigError('--model_dir is required: where checkpoints '
                                 'and results go.')
  source = data_lib.get_source(cfg.dataset, cfg.data_dir, cfg.on_corrupt)
  num_train = source.num_examples(cfg.train_split)
  num_eval = (source.num_examples(cfg.eval_split)  # fails early if absent
              if cfg.mode != 'train' or cfg.knn_monitor_steps else 0)
  if cfg.checkpoint:
    checkpoints.check_checkpoint(cfg.checkpoint, cfg.use_ema_weights)
  if cfg.mode == 'eval' and tf_config_names_workers():
    # Each worker would follow model_dir's checkpoints on its own timing.
    raise config_lib.ConfigError(
        '--mode=eval with several workers is not supported: run it in one '
        'process, without TF_CONFIG (or use --mode=train_then_eval).')
  strategy = build_strategy(cfg)
  replicas = strategy.num_replicas_in_sync
  logging.info('Running on %d replica(s) with %s', replicas,
               type(strategy).__name__)
  if cfg.jit_compile and replicas > 1 and not isinstance(
      strategy, tf.distribute.TPUStrategy):
    raise config_lib.ConfigError(
        f'--jit_compile with {replicas} replicas: XLA compilation of the '
        'step needs one replica per process (TPUs compile with XLA anyway).')
  for name in ('train_batch_size', 'eval_batch_size'):
    if getattr(cfg, name) % replicas:
      raise config_lib.ConfigError(
          f'--{name}={getattr(cfg, name)} is not divisible by the {replicas} '
          'replicas: use a multiple of it.')
  if is_chief(strategy):
    # Only the chief writes to model_dir.
    _check_writable(cfg.model_dir)
    if cfg.dataset.startswith(data_lib.FOLDER_PREFIX):
      source.write_class_names(cfg.model_dir)
  if cfg.seed is not None:
    # Python's, NumPy's and TensorFlow's global seeds: Keras initialisers
    # draw theirs from Python's.
    keras.utils.set_random_seed(cfg.seed)
  model = build_model(cfg, source.num_classes, strategy)
  with output_dir(cfg, strategy) as out_dir:
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
  if chief_decides(strategy, not tf.io.gfile.exists(exported)):
    export.export_and_rotate(model, out_dir, step, cfg.keep_hub_module_max)
  return None


def run_distill():
  """--train_mode=distill: distill.distill with the student of the model
  flags (a fine-tuning model: encoder and classifier); prints its result."""
  # Imported here: distill.py builds on this module's loop pieces.
  import distill  # pylint: disable=import-outside-toplevel
  if not FLAGS.teacher:
    raise config_lib.ConfigError('--train_mode=distill needs --teacher: the '
                                 'SavedModel of the fine-tuned teacher.')
  cfg = config_from_flags(train_mode='finetune')
  result = distill.distill(cfg, FLAGS.teacher, FLAGS.distill_temperature,
                           FLAGS.distill_alpha)
  if result is not None:
    print(json.dumps(result))


def run_convert():
  """--mode=convert: --checkpoint to --model_dir (convert_checkpoint.py);
  prints the summary and exits 1 when the outputs differ by more than
  --convert_tolerance."""
  if not FLAGS.checkpoint or not FLAGS.model_dir:
    raise config_lib.ConfigError('--mode=convert needs --checkpoint (the '
                                 'checkpoint to convert) and --model_dir (an '
                                 'output directory).')
  cfg = config_from_flags(mode='eval')
  summary = convert_checkpoint.convert(
      cfg.checkpoint, cfg.model_dir, cfg, use_ema=cfg.use_ema_weights,
      kernel_scale=FLAGS.kernel_scale)
  print(json.dumps(summary))
  worst = max(summary['max_rel_diff'].values())
  if worst > FLAGS.convert_tolerance:
    print(f'error: converted outputs differ from the source by {worst:.3g} '
          f'(relative) > --convert_tolerance={FLAGS.convert_tolerance}.',
          file=sys.stderr)
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    if FLAGS.train_mode == 'distill':
      run_distill()
    elif FLAGS.mode == 'convert':
      run_convert()
    else:
      run(config_from_flags())
  except (config_lib.ConfigError, data_lib.DatasetError,
          checkpoints.CheckpointError, TrainingDiverged) as e:
    # One line for the person at the terminal, no stack trace.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except tf.errors.ResourceExhaustedError:
    print(f'error: out of memory with --train_batch_size='
          f'{FLAGS.train_batch_size} and --eval_batch_size='
          f'{FLAGS.eval_batch_size} (per replica: divided by the replicas); '
          'try smaller batches or a smaller --resnet_depth/--width_multiplier.',
          file=sys.stderr)
    sys.exit(2)
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
          tf.errors.CancelledError, tf.errors.AbortedError) as e:
    # In a multi-worker run these mean a worker died or became unreachable
    # (TensorFlow aborts the collectives of every other worker).
    if not tf_config_names_workers():
      raise
    print(f'error: {lost_worker_message(e, FLAGS.model_dir)}',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  # distill.py imports this module as `run`: it must find this instance, not
  # execute the file a second time (every flag would be defined twice).
  sys.modules['run'] = sys.modules[__name__]
  app.run(main)
