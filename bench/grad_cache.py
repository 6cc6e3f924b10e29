r"""Gradient-cached NT-Xent (--grad_cache_chunks): peak memory and images/s
of a pretraining step per batch and number of chunks K.

  python bench/grad_cache.py                        # the full grid (a GPU)
  python bench/grad_cache.py --models=r18_32 --batches=256,1024
  python bench/grad_cache.py --fit_gb=24            # largest batch in 24 GB

Prints one JSON line per (model, batch, K), each measured in a fresh
process so that its peak memory is its own: `images_per_s` of the whole
step (two views, LARS, synthetic data already in memory), `peak_gpu_mb`
(TensorFlow's peak allocation on GPU:0) on a GPU, `peak_rss_mb` (the
process's resident-set high-water mark) always. A setting that runs out of
memory prints its line with `"error": "out of memory"`.

`--fit_gb=G`: the largest batch (a power of two, then bisected to a multiple
of 8 * K) whose step fits in G GB, with K = 1 and the largest K of
--chunks. On a GPU the device's memory is limited to G GB
(a logical device); on a CPU the process's address space is limited to G GB
(RLIMIT_AS: it counts TensorFlow's own mappings too, so it is a stricter
bound than G GB of tensors).
"""
import json
import os
import resource
import subprocess
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

import common  # pylint: disable=g-import-not-at-top  (bench/)
from config import Config  # pylint: disable=g-import-not-at-top
import model as model_lib  # pylint: disable=g-import-not-at-top
import training  # pylint: disable=g-import-not-at-top

MODELS = {
    'r18_32': dict(resnet_depth=18, image_size=32),
    'r50_224': dict(resnet_depth=50, image_size=224),
}

FLAGS = flags.FLAGS
flags.DEFINE_list('models', list(MODELS), 'Which of: ' + ', '.join(MODELS))
flags.DEFINE_list('batches', ['256', '1024', '4096'], 'Global batch sizes.')
flags.DEFINE_list('chunks', ['1', '2', '4', '8'],
                  'Values of --grad_cache_chunks (1: the plain step).')
flags.DEFINE_string('precision', 'float32', 'Precision policy.')
flags.DEFINE_float('seconds', 0, 'Timed seconds per setting (at least 3 '
                   'steps, after 2 warm-up steps).')
flags.DEFINE_float('fit_gb', 0, 'If > 0: find the largest batch that fits '
                   'in this many GB, with K = 1 and the largest --chunks.')
flags.DEFINE_string('one', '', 'Internal: measure one "model,batch,K" in '
                    'this process.')
flags.DEFINE_float('limit_gb', 0, 'Internal: the memory limit of --one.')


def limit_memory(gigabytes):
  gpus = tf.config.list_physical_devices('GPU')
  if gpus:
    tf.config.set_logical_device_configuration(gpus[0], [
        tf.config.LogicalDeviceConfiguration(
            memory_limit=int(gigabytes * 1024))])
  else:
    limit = int(gigabytes * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def measure(model_name, batch, chunks, seconds):
  cfg = Config(learning_rate=1.0, temperature=0.5, warmup_epochs=0,
               use_blur=False, train_batch_size=batch,
               grad_cache_chunks=chunks, precision=FLAGS.precision,
               **MODELS[model_name]).validate()
  size = cfg.image_size
  classes = 1000 if size > 32 else 10
  with model_lib.precision_policy(cfg.precision):
    model = model_lib.Model(classes, cfg)
    model(tf.zeros([1, size, size, 3]), training=False)
  optimizer = model_lib.build_optimizer(
      model_lib.WarmUpAndCosineDecay(cfg.learning_rate, 50000, cfg), cfg)
  views = tf.random.uniform([batch, size, size, 6])
  labels = tf.one_hot(tf.range(batch) % classes, classes)
  step = tf.function(training.make_train_step(model, optimizer, cfg))
  rate = common.timed(lambda: step(views, labels)['total_loss'], seconds)
  return {'bench': 'grad_cache', 'model': model_name, 'batch': batch,
          'chunks': chunks, 'precision': cfg.precision,
          'device': 'GPU' if tf.config.list_physical_devices('GPU') else
                    'CPU',
          'images_per_s': round(rate * batch, 2),
          **common.peak_memory()}


def in_subprocess(model_name, batch, chunks, limit_gb=0):
  """`measure` in a fresh process; an out-of-memory failure gives a line
  with "error"."""
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__),
       f'--one={model_name},{batch},{chunks}', f'--limit_gb={limit_gb}',
       f'--precision={FLAGS.precision}', f'--seconds={FLAGS.seconds}'],
      capture_output=True, text=True, check=False)
  if proc.returncode == 0:
    return json.loads(proc.stdout.strip().splitlines()[-1])
  text = proc.stderr + proc.stdout
  oom = any(s in text for s in ('ResourceExhausted', 'OOM', 'bad_alloc',
                                'Cannot allocate', 'MemoryError')) or (
                                    proc.returncode in (-9, 137))
  last = (text.strip().splitlines() or ['no output'])[-1][:300]
  if proc.returncode == -9:  # on Linux, usually the kernel's OOM killer
    last = 'killed by SIGKILL (the kernel\'s out-of-memory killer?)'
  return {'bench': 'grad_cache', 'model': model_name, 'batch': batch,
          'chunks': chunks, 'error': 'out of memory' if oom else last,
          'detail': last}


def largest_batch(model_name, chunks, gigabytes):
  """The largest multiple of 8 * chunks that fits, by doubling then
  bisection."""
  unit = 8 * chunks
  fits = lambda b: 'error' not in in_subprocess(model_name, b, chunks,
                                                gigabytes)
  low, high = 0, unit
  while fits(high):
    low, high = high, high * 2
  while high - low > unit:
    middle = (low + high) // 2 // unit * unit
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low


def main(argv):
  del argv
  if FLAGS.one:
    if FLAGS.limit_gb:
      limit_memory(FLAGS.limit_gb)
    name, batch, chunks = FLAGS.one.split(',')
    print(json.dumps(measure(name, int(batch), int(chunks), FLAGS.seconds)))
    return
  print(json.dumps({'bench': 'grad_cache', 'machine': common.machine()}),
        flush=True)
  chunk_values = [int(k) for k in FLAGS.chunks]
  for name in FLAGS.models:
    if FLAGS.fit_gb:
      for chunks in sorted({1, max(chunk_values)}):
        print(json.dumps({
            'bench': 'grad_cache_fit', 'model': name, 'chunks': chunks,
            'memory_gb': FLAGS.fit_gb,
            'limit': 'GPU logical device' if tf.config.list_physical_devices(
                'GPU') else 'RLIMIT_AS (address space)',
            'largest_batch': largest_batch(name, chunks, FLAGS.fit_gb)}),
              flush=True)
      continue
    for batch in (int(b) for b in FLAGS.batches):
      for chunks in chunk_values:
        print(json.dumps(in_subprocess(name, batch, chunks)), flush=True)


if __name__ == '__main__':
  app.run(main)
