r"""Training-step throughput on synthetic device-resident data, and the ceiling.

  python bench/train_step.py                      # the issue's three settings
  python bench/train_step.py --configs=r18_32_b128 --precisions=mixed_bfloat16

Prints one JSON line per (config, precision): images/s (and views/s) of a
pretraining step with LARS (model alone: the batch is a constant on the
device), the step's FLOPs and achieved FLOP/s, and one JSON line with the
machine's ceiling: the FLOP/s of a large matmul in float32 and bfloat16
measured in the same run.

Memory: each (config, precision) runs in its own subprocess (unless
--in_process), so its `peak_rss_mb` (the process's resident-set high-water mark: model, optimizer
slots, activations of the step, TensorFlow itself) belongs to that setting
alone; on a GPU `peak_gpu_mb` is TensorFlow's peak allocation on GPU:0.

FLOPs are TensorFlow's own count for the traced step (forward, backward and
optimizer ops that register a FLOP statistic: convolutions and their two
backward ops, matmuls, element-wise ops), from `tf.compat.v1.profiler` on the
step's graph; a multiply-add counts as 2.
"""
import json
import os
import subprocess
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from common import machine, peak_memory, timed  # pylint: disable=g-import-not-at-top  (bench/)
import model as model_lib  # pylint: disable=g-import-not-at-top
import training  # pylint: disable=g-import-not-at-top
from config import Config  # pylint: disable=g-import-not-at-top

CONFIGS = {
    'r18_32_b8': dict(resnet_depth=18, image_size=32, train_batch_size=8),
    'r18_32_b128': dict(resnet_depth=18, image_size=32, train_batch_size=128),
    'r18_32_b256': dict(resnet_depth=18, image_size=32, train_batch_size=256),
    'r50_224_b32': dict(resnet_depth=50, image_size=224, train_batch_size=32),
    'r50_224_b128': dict(resnet_depth=50, image_size=224,
                         train_batch_size=128),
    'r50_224_b256': dict(resnet_depth=50, image_size=224,
                         train_batch_size=256),
}
DEFAULT_CONFIGS = ['r18_32_b128', 'r18_32_b256', 'r50_224_b32']

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', DEFAULT_CONFIGS, 'Which of: ' +
                  ', '.join(sorted(CONFIGS)))
flags.DEFINE_list('precisions', ['float32', 'mixed_bfloat16'],
                  'Precision policies to measure (mixed_float16 for GPUs), '
                  'with "+fused" / "+unfused" for --fused_batch_norm=True / '
                  'False (unset: fused under mixed precision only) and '
                  '"+xla" for --jit_compile, e.g. mixed_float16+xla.')
flags.DEFINE_float('seconds', 20., 'Timed seconds per setting (after warm-up).')
flags.DEFINE_integer('matmul_size', 4096, 'Side of the ceiling matmul.')
flags.DEFINE_bool('one_setting', False, 'Internal: measure the single '
                  '--configs x --precisions setting in this process.')
flags.DEFINE_bool('in_process', False, 'Measure every setting in this '
                  'process (quicker: one start-up; peak memory is then that '
                  'of all settings so far, not of each).')


def matmul_ceiling(dtype, size, seconds):
  a = tf.random.uniform([size, size], dtype=tf.float32)
  a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
  matmul = tf.function(lambda: tf.reduce_sum(tf.cast(
      tf.linalg.matmul(a, b), tf.float32)[:1, :1]))
  return 2 * size**3 * timed(matmul, seconds)


def graph_flops(concrete_fn):
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options['output'] = 'none'
  profile = tf.compat.v1.profiler.profile(concrete_fn.graph, options=options)
  return profile.total_float_ops


def parse_setting(setting):
  """(precision, fused_batch_norm, jit_compile) of e.g. 'float32+fused+xla'."""
  precision, *options = setting.split('+')
  unknown = set(options) - {'fused', 'unfused', 'xla'}
  if unknown or ('fused' in options and 'unfused' in options):
    raise app.UsageError(f'--precisions: cannot read {setting!r}; expected '
                         'a precision with +fused or +unfused and/or +xla.')
  fused = True if 'fused' in options else False if 'unfused' in options \
      else None
  return precision, fused, 'xla' in options


def bench_step(name, setting, seconds):
  precision, fused, xla = parse_setting(setting)
  cfg = Config(learning_rate=1.0, temperature=0.5, weight_decay=1e-6,
               warmup_epochs=0, use_blur=False, precision=precision,
               fused_batch_norm=fused, jit_compile=xla,
               **CONFIGS[name]).validate()
  batch, size = cfg.train_batch_size, cfg.image_size
  with model_lib.precision_policy(precision):
    model = model_lib.Model(1000 if size > 32 else 10, cfg)
    model(tf.zeros([1, size, size, 3]), training=False)
  optimizer = model_lib.build_optimizer(
      model_lib.WarmUpAndCosineDecay(cfg.learning_rate, 50000, cfg), cfg)
  views = tf.random.uniform([batch, size, size, 6])
  labels = tf.one_hot(tf.range(batch) % 10, 1000 if size > 32 else 10)
  # Counted on the plain graph, traced with an optimizer of its own (a
  # loss-scale wrapper takes one optimizer once): with XLA the step calls a
  # compiled function whose operations the profiler does not see.
  counting_optimizer = model_lib.build_optimizer(
      model_lib.WarmUpAndCosineDecay(cfg.learning_rate, 50000, cfg), cfg)
  flops = graph_flops(tf.function(training.make_train_step(
      model, counting_optimizer, cfg.replace(jit_compile=False))
                                 ).get_concrete_function(views, labels))
  step = tf.function(training.make_train_step(model, optimizer, cfg))
  rate = timed(lambda: step(views, labels)['total_loss'], seconds)
  return {'bench': 'train_step', 'config': name, 'precision': precision,
          'fused_batch_norm': cfg.use_fused_batch_norm, 'jit_compile': xla,
          'device': 'GPU' if tf.config.list_physical_devices('GPU') else
                    'CPU',
          'batch': batch, 'image_size': size, 'optimizer': cfg.optimizer,
          'images_per_s': round(rate * batch, 2),
          'views_per_s': round(2 * rate * batch, 2),
          'step_gflop': round(flops / 1e9, 2),
          'achieved_gflop_per_s': round(rate * flops / 1e9, 1),
          **peak_memory()}


def measure_in_subprocess(name, precision):
  """bench_step(name, precision) in a fresh process: its own peak memory."""
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--one_setting',
       f'--configs={name}', f'--precisions={precision}',
       f'--seconds={FLAGS.seconds}'], capture_output=True, text=True,
      check=False)
  if proc.returncode:
    raise RuntimeError(f'{name} {precision} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  for name in FLAGS.configs:
    if name not in CONFIGS:
      raise app.UsageError(f'--configs: unknown {name!r}; expected one of '
                           f'{", ".join(sorted(CONFIGS))}')
  if FLAGS.one_setting:
    print(json.dumps(bench_step(FLAGS.configs[0], FLAGS.precisions[0],
                                FLAGS.seconds)))
    return
  ceiling = {'bench': 'matmul_ceiling', 'size': FLAGS.matmul_size,
             'machine': machine()}
  for dtype in (tf.float32, tf.bfloat16):
    ceiling[f'{dtype.name}_gflop_per_s'] = round(matmul_ceiling(
        dtype, FLAGS.matmul_size, FLAGS.seconds / 2) / 1e9, 1)
  print(json.dumps(ceiling), flush=True)
  failed = 0
  for name in FLAGS.configs:
    for precision in FLAGS.precisions:
      try:
        result = (bench_step(name, precision, FLAGS.seconds)
                  if FLAGS.in_process else
                  measure_in_subprocess(name, precision))
      except (RuntimeError, tf.errors.OpError) as e:  # ends that one only
        failed += 1
        last = str(e).strip().splitlines()[-1][:300]
        print(json.dumps({'bench': 'train_step', 'config': name,
                          'precision': precision, 'error': last}),
              flush=True)
        continue
      for dtype in ('float32', 'bfloat16'):
        result[f'fraction_of_{dtype}_ceiling'] = round(
            result['achieved_gflop_per_s'] / ceiling[f'{dtype}_gflop_per_s'],
            3)
      print(json.dumps(result), flush=True)
  if failed:
    sys.exit(f'{failed} setting(s) failed')


if __name__ == '__main__':
  app.run(main)
