"""Throughput of the SimCLR pretraining augmentation on this machine.

Prints one JSON line per measurement (images/s plus settings and machine):

* `augment`: one training view per image, jitter strength 0.5, batch 256,
  from in-memory uint8 images, for the two paths data.py chooses between:
  "per_example" (`data_util.preprocess_image` in `tf.data` map with AUTOTUNE,
  then batch: the original's recipe, used for images above
  data.BATCHED_AUGMENTATION_MAX_SIZE or of varying size) and "batched"
  (batch, then `data_util.batch_preprocess_for_train` in map with AUTOTUNE:
  used for small images of one size); with --original_dir also "original",
  the original's own `data_util.preprocess_image` in the per-example recipe,
  in the same run;
* `end_to_end`: two views per image stacked on channels, as pretraining
  needs, through a whole pipeline (cache, shuffle, repeat, augment, one-hot
  labels, batch, prefetch) for both paths.

Sources: CIFAR-10 train images from the TFDS directory when available (else
random uint8) at 32 px; larger sizes use the same images upsampled (bilinear)
to size + size // 7 (256 for 224), or random uint8 (the JSON says which).

  python bench/augment.py [--sizes 32,224] [--batches 30] [--quick]
      [--original_dir ../original_simclr/tf2]
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from config import Config  # pylint: disable=g-import-not-at-top
import data  # pylint: disable=g-import-not-at-top
import data_util  # pylint: disable=g-import-not-at-top

BATCH = 256
STRENGTH = 0.5


def machine():
  model = 'unknown'
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name'):
        model = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  return {'cpu': model, 'cores': os.cpu_count(),
          'affinity': len(os.sched_getaffinity(0)),
          'tf': tf.__version__, 'python': platform.python_version()}


def load_images(num, data_dir):
  """uint8 [num, 32, 32, 3] and int labels, plus a source description."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    ds = tfds.load('cifar10', split=f'train[:{num}]', data_dir=data_dir,
                   batch_size=-1)
    return ds['image'].numpy(), ds['label'].numpy(), 'cifar10'
  except Exception as e:  # pylint: disable=broad-except
    print(f'# cifar10 unavailable ({type(e).__name__}); random images',
          file=sys.stderr)
    images = tf.random.uniform([num, 32, 32, 3], 0, 256, tf.int32, seed=0)
    return tf.cast(images, tf.uint8).numpy(), (
        tf.range(num) % 10).numpy(), 'random'


def upsample(images, size):
  out = []
  for start in range(0, len(images), 256):
    chunk = tf.image.resize(images[start:start + 256], [size, size],
                            method='bilinear')
    out.append(tf.cast(tf.clip_by_value(tf.round(chunk), 0, 255), tf.uint8))
  return tf.concat(out, 0)


def load_original(original_dir):
  """The original's data_util module (it reads no flags), or None."""
  if not original_dir:
    return None
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(original_dir) / 'data_util.py'
  if not path.is_file():
    sys.exit(f'--original_dir: no data_util.py in {original_dir}; expected '
             "the original's tf2/ directory")
  spec = importlib.util.spec_from_file_location('original_data_util', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def one_view_dataset(images, size, path, original=None):
  ds = tf.data.Dataset.from_tensor_slices(images).repeat()
  if path in ('per_example', 'original'):
    module = original if path == 'original' else data_util
    ds = ds.map(lambda x: module.preprocess_image(
        x, size, size, is_training=True, color_jitter_strength=STRENGTH),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(BATCH, drop_remainder=True)
  else:
    ds = ds.batch(BATCH, drop_remainder=True)
    ds = ds.map(lambda x: data_util.batch_preprocess_for_train(
        x, size, size, color_jitter_strength=STRENGTH),
                num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def two_view_dataset(images, labels, size, path):
  """The pretraining pipeline of data.py, with either augmentation path."""
  ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
  ds = ds.cache().shuffle(BATCH * (50 if size <= 32 else 10)).repeat()
  if path == 'per_example':
    def element(example):
      view = lambda: data_util.preprocess_image(  # pylint: disable=g-long-lambda
          example['image'], size, size, is_training=True,
          color_jitter_strength=STRENGTH)
      return (tf.concat([view(), view()], -1),
              {'labels': tf.one_hot(example['label'], 10),
               'mask': tf.constant(1.)})
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(BATCH, drop_remainder=True)
  else:
    def batch_element(example):
      views = data_util.batch_preprocess_two_views(
          example['image'], size, size, color_jitter_strength=STRENGTH)
      return views, {'labels': tf.one_hot(example['label'], 10),
                     'mask': tf.ones([BATCH])}
    ds = ds.batch(BATCH, drop_remainder=True)
    ds = ds.map(batch_element, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def measure(datasets, warmup, batches, repeats):
  """{path: images/s of each repeat} for datasets {path: dataset}.

  Repeats take turns across the paths (path A, B, C, A, B, C, ...) so that
  each path sees the same spells of machine noise; each turn starts a fresh
  iterator and discards `warmup` batches, so no path profits from batches
  another one's timing let it buffer.
  """
  rates = {path: [] for path in datasets}
  for _ in range(repeats):
    for path, ds in datasets.items():
      it = iter(ds)
      for _ in range(warmup):
        next(it)
      start = time.perf_counter()
      for _ in range(batches):
        next(it)
      rates[path].append(batches * BATCH / (time.perf_counter() - start))
      del it
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='32,224')
  parser.add_argument('--batches', type=int, default=None,
                      help='timed batches per repeat at 32 px (default 40); '
                      'at larger sizes scaled down (min 3)')
  parser.add_argument('--warmup', type=int, default=None)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--num_images', type=int, default=10000,
                      help='source images held in memory at 32 px (2048 '
                      'at larger sizes)')
  parser.add_argument('--data_dir', default=str(ROOT.parent / 'shared' /
                                                'tfds'))
  parser.add_argument('--quick', action='store_true',
                      help='a few-second smoke run')
  parser.add_argument('--original_dir', default=None,
                      help="the original's tf2/ directory: also time its "
                      'data_util.preprocess_image (one view) in this run')
  args = parser.parse_args()
  original = load_original(args.original_dir)
  if args.quick:
    args.sizes, args.repeats = '32', 1
    args.batches = args.batches or 3
    args.warmup = 1 if args.warmup is None else args.warmup
    args.num_images = min(args.num_images, 1024)
  info = machine()
  base_images, labels, source = load_images(args.num_images, args.data_dir)
  for size in [int(s) for s in args.sizes.split(',')]:
    batches = args.batches or 40
    warmup = 3 if args.warmup is None else args.warmup
    if size > 32:
      batches = max(3, batches * 32 // size * 2) if not args.quick else batches
      warmup = min(warmup, 2)
      num = min(len(base_images), 2048)
      images = upsample(base_images[:num], size + size // 7)  # 224 -> 256
      lab = labels[:num]
      src = f'{source} upsampled bilinear to {images.shape[1]}px'
    else:
      images, lab, src = tf.constant(base_images), labels, f'{source} 32px'
    rows = {}
    data_path = ('batched' if data.use_batched_augmentation(
        Config(image_size=size), images.shape[1:])
                 else 'per_example')
    for kind in ('augment', 'end_to_end'):
      paths = ['per_example', 'batched']
      if kind == 'augment' and original is not None:
        paths.append('original')
      datasets = {path: (one_view_dataset(images, size, path, original)
                         if kind == 'augment'
                         else two_view_dataset(images, lab, size, path))
                  for path in paths}
      all_rates = measure(datasets, warmup, batches, args.repeats)
      for path in paths:
        rates = all_rates[path]
        row = {'measurement': kind, 'path': path, 'size': size,
               'views': 1 if kind == 'augment' else 2,
               'images_per_s': round(statistics.median(rates), 1),
               'repeats_images_per_s': [round(r, 1) for r in rates],
               'batch': BATCH, 'timed_batches': batches, 'warmup': warmup,
               'jitter_strength': STRENGTH, 'source': src,
               'source_images': int(images.shape[0]),
               'used_by_data_py': path == data_path,
               'load_avg_1m': round(os.getloadavg()[0], 2), **info}
        rows[(kind, path)] = row
        if path == 'batched':
          row['speedup_vs_per_example'] = round(
              row['images_per_s'] / rows[(kind, 'per_example')]
              ['images_per_s'], 2)
        if path == 'original':
          for ours in ('per_example', 'batched'):
            row[f'{ours}_over_original'] = round(
                rows[(kind, ours)]['images_per_s'] / row['images_per_s'], 2)
        print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
