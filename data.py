"""Datasets and input pipelines: TFDS, image folders (labelled or not),
TFRecord files and the embedded dataset.

A *source* is what a dataset name resolves to (`get_source`): it knows its
class names, its split sizes and gives raw examples
(`{'image': uint8 [H, W, 3], 'label': int64}`). The pipelines
(`build_input_fn`, `build_distributed_dataset`) turn a source into batches of

    images: [B, H, W, 3 * views] float32 in [0, 1] (pretraining: two views
            stacked on the channel axis; otherwise one)
    labels: {'labels': [B, num_classes] one-hot, 'mask': [B] float32}

per replica. Training pipelines shuffle and repeat; evaluation pipelines do
not repeat, and are padded with mask-0 examples so that every replica runs the
same number of full batches and every real example is counted exactly once
(`eval_steps` gives that number).
"""
import functools
import hashlib
import math
import os

from absl import logging
import tensorflow as tf

import data_util
import image_folder
import tfrecord_source

FOLDER_PREFIX = 'folder:'
UNLABELLED_PREFIX = 'unlabelled:'

# Largest image side (source and output) that data.py augments a batch at a
# time (data_util's batched path). bench/augment.py on a 2-core CPU, two-view
# pipeline, batched over per-example images/s: 2.4-2.9x at 32 px; with the
# bench's upsampled sources 1.2x at 48 px (54-px sources) and 0.8x at 64 px
# (73-px sources): the batched crop matrices and color arithmetic grow with
# the pixels, while the per-example path's cost at small sizes is mostly a
# fixed overhead per op.
BATCHED_AUGMENTATION_MAX_SIZE = 48


# Features that name a TFDS example (cifar10, shapes10: id; imagenet2012:
# file_name).
ID_FEATURES = ('id', 'file_name')


# A dataset cannot be used; the message is one line for the user. One class
# for every source (run.py stops on it), defined where the sources start.
DatasetError = image_folder.DatasetError


class TfdsSource:
  """A prepared TFDS dataset behind the source interface."""

  fixed_size = True

  def __init__(self, builder):
    self.builder = builder
    self.name = builder.info.full_name
    label = builder.info.features['label']
    self.class_names = list(label.names)
    self.num_classes = label.num_classes
    self.splits = list(builder.info.splits.keys())

  def num_examples(self, split):
    """Examples in `split`: a split name or a TFDS slice of splits
    ('train[:10%]', 'train[10%:]', 'train[:1000]+test'), counted as TFDS
    reads them."""
    return self._split_info(split).num_examples

  def _split_info(self, split):
    try:
      info = self.builder.info.splits[split]
    except (ValueError, KeyError):
      raise DatasetError(
          f'split {split!r} not in dataset {self.name}: it has '
          f'{", ".join(self.splits)} (slices such as '
          f'{self.splits[0]}[:10%] work too).') from None
    if not info.num_examples:
      raise DatasetError(f'split {split!r} of dataset {self.name} has no '
                         'examples.')
    return info

  def as_dataset(self, split, shuffle_files=False, input_context=None,
                 seed=None):
    """Raw examples of `split`, this input pipeline's share of them.

    With several input pipelines (one per worker) each reads whole files of
    its own when the split has at least as many files as there are pipelines
    (TFDS's sharding, the original's); otherwise (small datasets are often
    one file) each reads its own contiguous, even slice of the examples.
    `seed` fixes the order of shuffled files.
    """
    return self._read(split, shuffle_files, input_context, seed)

  def _read(self, split, shuffle_files=False, input_context=None, seed=None,
            decoders=None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    info = self._split_info(split)
    pipelines = input_context.num_input_pipelines if input_context else 1
    if pipelines > 1 and info.num_shards < pipelines:
      split = tfds.even_splits(split, pipelines)[
          input_context.input_pipeline_id]
      input_context = None
    read_config = tfds.ReadConfig(input_context=input_context,
                                  shuffle_seed=seed)
    return self.builder.as_dataset(split=split, shuffle_files=shuffle_files,
                                   read_config=read_config, decoders=decoders)

  def ids(self, split):
    """The examples' ids (`id` or `file_name` feature, else their position)
    in the order `as_dataset(split)` gives them; the images are not
    decoded."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    features = self.builder.info.features
    key = next((k for k in ID_FEATURES if k in features), None)
    if key is None:
      return [str(i) for i in range(self.num_examples(split))]
    dataset = self._read(split, decoders={
        'image': tfds.decode.SkipDecoding()}).map(lambda ex: ex[key])
    return [i.decode() for i in dataset.as_numpy_iterator()]


def source_for(config):
  """The source of `config.dataset`, with the config's data options."""
  return get_source(config.dataset, config.data_dir, config.on_corrupt,
                    tfrecord_source.Features(
                        config.tfrecord_image_key, config.tfrecord_label_key,
                        config.tfrecord_num_classes, config.train_split))


def get_source(dataset, data_dir=None, on_corrupt='fail',
               tfrecord_features=tfrecord_source.Features()):
  """Resolves a dataset name to a source, or raises a one-line DatasetError.

  Args:
    dataset: a TFDS name (`cifar10`, `imagenet2012_subset/1pct`, ...),
      `shapes10` (the embedded dataset, generated on first use),
      `folder:/path/to/root` (one sub-directory per split, then per class),
      `unlabelled:/path/to/root` (images at any depth, no labels: one
      split, `train`, and `num_classes` 0) or `tfrecord:/path/to/root`
      (TFRecord files; splits are file patterns, see tfrecord_source.py).
    data_dir: TFDS data directory (default: TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    on_corrupt: image folders only: 'fail' or 'skip' unreadable images.
    tfrecord_features: TFRecord files only: the features to read.
  """
  if dataset.startswith(tfrecord_source.PREFIX):
    return tfrecord_source.TfrecordSource(
        dataset[len(tfrecord_source.PREFIX):], tfrecord_features)
  for prefix, labelled in ((FOLDER_PREFIX, True), (UNLABELLED_PREFIX, False)):
    if dataset.startswith(prefix):
      return image_folder.ImageFolderBuilder(
          dataset[len(prefix):], on_corrupt=on_corrupt, labelled=labelled)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  import embedded_dataset  # pylint: disable=import-outside-toplevel
  if dataset == embedded_dataset.NAME:
    return TfdsSource(embedded_dataset.load_builder(data_dir))
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DatasetError(f'dataset {dataset!r} is not a TFDS dataset, '
                       f'{FOLDER_PREFIX}<path>, {UNLABELLED_PREFIX}<path>, '
                       f'{tfrecord_source.PREFIX}<path> or '
                       f'{embedded_dataset.NAME} ({first})') from None
  if not builder.is_prepared():
    how = f'run `tfds build {dataset} --data_dir={where}`'
    if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
      manual_dir = os.path.join(where, 'downloads', 'manual')
      how = f'put its manual download in {manual_dir}, then {how}'
    raise DatasetError(f'dataset {dataset!r} is not prepared in {where} '
                       f'(looked for {builder.data_dir}): {how}.')
  return TfdsSource(builder)


def check_labelled(source, config):
  """Raises DatasetError (one line) when `source` has no labels
  (`num_classes` 0) but the run `config` describes needs them."""
  if source.num_classes:
    return
  needs = []
  if config.train_mode == 'finetune':
    needs.append('--train_mode=finetune trains a classifier on them')
  elif config.train_mode == 'pretrain' and config.lineareval_while_pretraining:
    needs.append('--lineareval_while_pretraining (on by default) trains a '
                 'linear head on them: pass --lineareval_while_pretraining='
                 'False')
  if config.knn_monitor_steps:
    needs.append('the kNN monitor evaluates with them: pass '
                 '--knn_monitor_steps=0')
  if needs:
    raise DatasetError(f'dataset {source.name} has no labels, but '
                       f'{"; ".join(needs)}.')


def _preprocess_fn(config, is_training, fixed_size):
  """`fn(image, seed=None)`: uint8 [H, W, 3] -> float32 [S, S, 3 * views].

  `seed` (a stateless shape-[2] seed, training only) fixes the augmentations.
  """
  pretrain = config.train_mode == 'pretrain'
  size = config.image_size
  # The original center-crops for evaluation only above 32 pixels (CIFAR
  # images are used whole); images of unknown size are always cropped.
  test_crop = size > 32 or not fixed_size
  one_view = functools.partial(
      data_util.preprocess_image, height=size, width=size,
      is_training=is_training,
      color_jitter_strength=(config.color_jitter_strength
                             if is_training and pretrain else 0.),
      test_crop=test_crop)
  if is_training and pretrain:
    def two_views(image, seed=None):
      seeds = [None, None] if seed is None else tf.unstack(
          tf.random.experimental.stateless_split(seed, 2))
      return tf.concat([one_view(image, seed=seeds[0]),
                        one_view(image, seed=seeds[1])], -1)
    return two_views
  return one_view


def _batched_train_fn(config):
  """`fn(images, seed=None)`: uint8 [B, H, W, 3] -> float32 [B, S, S, 3 *
  views], the training augmentation of `_preprocess_fn` for a whole batch."""
  size = config.image_size
  if config.train_mode == 'pretrain':
    return functools.partial(
        data_util.batch_preprocess_two_views, height=size, width=size,
        color_jitter_strength=config.color_jitter_strength)
  return functools.partial(data_util.batch_preprocess_for_train, height=size,
                           width=size)


def use_batched_augmentation(config, image_shape):
  """Whether training batches are augmented whole: on by the config, for
  images of one static size, all sides at most
  BATCHED_AUGMENTATION_MAX_SIZE."""
  if not config.batched_augmentation or not image_shape.is_fully_defined():
    return False
  sides = [*image_shape.as_list()[:2], config.image_size]
  return max(sides) <= BATCHED_AUGMENTATION_MAX_SIZE


def _seeded_map(dataset, fn, seed, pipeline_id):
  """Parallel map of `fn(element, seed=None)`; with a run seed, element i of
  this input pipeline gets its own stateless seed, so the result does not
  depend on the map's parallelism."""
  if seed is None:
    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  base = tf.constant([seed, pipeline_id], tf.int64)
  return dataset.enumerate().map(
      lambda i, element: fn(
          element, seed=tf.random.experimental.stateless_fold_in(base, i)),
      num_parallel_calls=tf.data.AUTOTUNE)


def eval_steps(num_examples, global_batch_size, num_replicas=1,
               num_input_pipelines=1):
  """Eval batches per replica needed to see every example once."""
  per_replica = global_batch_size // num_replicas
  replicas_per_pipeline = num_replicas // num_input_pipelines
  shard = math.ceil(num_examples / num_input_pipelines)
  return max(1, math.ceil(shard / (per_replica * replicas_per_pipeline)))


def resumed_seed(seed, start_step):
  """The input seed of a run seeded `seed` that (re)starts at `start_step`."""
  if seed is None or not start_step:
    return seed
  digest = hashlib.sha256(f'{seed}/{start_step}'.encode()).digest()
  return int.from_bytes(digest[:4], 'big') >> 1


def num_eval_examples(source, split, max_examples=0):
  """Examples an eval pipeline over `split` reads: all, or the first N > 0."""
  total = source.num_examples(split)
  return min(total, max_examples) if max_examples > 0 else total


def build_input_fn(source, global_batch_size, is_training, config,
                   num_replicas=1, split=None, max_examples=0,
                   with_index=False):
  """Returns `input_fn(input_context=None) -> tf.data.Dataset` per replica.

  Args:
    source: from `get_source`.
    global_batch_size: examples per step over all replicas.
    is_training: train pipeline (split `config.train_split`, augmented,
      shuffled, repeated, full batches) or eval (`config.eval_split`).
    config: the run's `Config`.
    num_replicas: replicas in sync (for the eval padding).
    split: eval only: read this split instead of `config.eval_split` (the kNN
      monitor's feature bank reads the train split with eval preprocessing).
    max_examples: eval only: if > 0, only the split's first `max_examples`
      examples (in the order stored, unshuffled); see `num_eval_examples`.
    with_index: eval only: the labels also hold `index`, the example's
      position in the split (`source.ids(split)` order; -1 for padding), and
      `label`, its int64 class (-1 unlabelled or padding).
  """
  if is_training and (split is not None or max_examples or with_index):
    raise ValueError('split, max_examples and with_index are for eval '
                     'pipelines only.')
  split = split or (config.train_split if is_training else config.eval_split)
  num_classes = source.num_classes
  preprocess = _preprocess_fn(config, is_training,
                              getattr(source, 'fixed_size', False))
  num_examples = num_eval_examples(source, split, max_examples)

  def to_batch_element(example, seed=None):
    image = preprocess(example['image'], seed=seed)
    labels = {'labels': tf.one_hot(example['label'], num_classes),
              'mask': tf.constant(1.)}
    if with_index:
      labels.update(index=example['index'], label=example['label'])
    return image, labels

  def _batched_train_dataset(dataset, batch_size, seed, pipeline_id):
    augment = _batched_train_fn(config)

    def to_batch(examples, seed=None):
      images = augment(examples['image'], seed=seed)
      labels = {'labels': tf.one_hot(examples['label'], num_classes),
                'mask': tf.ones([batch_size])}
      return images, labels

    # Only what the pipeline uses: other features (ids, strings of varying
    # length) need not batch.
    dataset = dataset.map(lambda ex: {'image': ex['image'],
                                      'label': ex['label']})
    dataset = dataset.batch(batch_size, drop_remainder=True)
    # Seeded: one seed per batch, so a seeded run's views depend on the
    # per-replica batch size (and differ from the per-example path's).
    dataset = _seeded_map(dataset, to_batch, seed, pipeline_id)
    return dataset.prefetch(tf.data.AUTOTUNE)

  def input_fn(input_context=None):
    if input_context is not None:
      batch_size = input_context.get_per_replica_batch_size(global_batch_size)
      pipelines = input_context.num_input_pipelines
      pipeline_id = input_context.input_pipeline_id
    else:
      batch_size, pipelines, pipeline_id = global_batch_size, 1, 0
    logging.info('%s input pipeline %d/%d: %s split %r, %d per replica',
                 'train' if is_training else 'eval', pipeline_id + 1,
                 pipelines, source.name, split, batch_size)
    if is_training:
      seed = config.seed
      dataset = source.as_dataset(split, shuffle_files=True,
                                  input_context=input_context, seed=seed)
      if config.cache_dataset:
        dataset = dataset.cache()
      # The original's buffer: 50 batches for small images, 10 otherwise.
      multiplier = 50 if config.image_size <= 32 else 10
      dataset = dataset.shuffle(batch_size * multiplier, seed=seed).repeat()
      if use_batched_augmentation(config, dataset.element_spec['image'].shape):
        logging.info('augmenting whole batches (data_util batched path)')
        return _batched_train_dataset(dataset, batch_size, seed, pipeline_id)
      dataset = _seeded_map(dataset, to_batch_element, seed, pipeline_id)
      dataset = dataset.batch(batch_size, drop_remainder=True)
      return dataset.prefetch(tf.data.AUTOTUNE)

    # Evaluation: shard by example (not by file) so shards differ by at most
    # one example, then pad every shard to the same number of full batches.
    dataset = source.as_dataset(split, shuffle_files=False)
    if with_index:
      dataset = dataset.enumerate().map(
          lambda i, example: dict(example, index=i))
    if max_examples:
      dataset = dataset.take(num_examples)
    if pipelines > 1:
      dataset = dataset.shard(pipelines, pipeline_id)
    if config.cache_dataset:
      dataset = dataset.cache()
    dataset = dataset.map(to_batch_element,
                          num_parallel_calls=tf.data.AUTOTUNE)
    replicas_here = max(1, num_replicas // pipelines)
    steps = eval_steps(num_examples, batch_size * num_replicas, num_replicas,
                       pipelines)
    shard_size = (num_examples // pipelines +
                  (1 if pipeline_id < num_examples % pipelines else 0))
    padding = steps * batch_size * replicas_here - shard_size
    size = config.image_size
    blank = (tf.zeros([size, size, 3]),
             {'labels': tf.zeros([num_classes]), 'mask': tf.constant(0.)})
    if with_index:
      blank[1].update(index=tf.constant(-1, tf.int64),
                      label=tf.constant(-1, tf.int64))
    dataset = dataset.concatenate(
        tf.data.Dataset.from_tensors(blank).repeat(padding))
    dataset = dataset.batch(batch_size, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)

  return input_fn


def num_input_pipelines(strategy):
  """Input pipelines `distribute_datasets_from_function` makes: one per worker
  of a MultiWorkerMirroredStrategy cluster, else one."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  jobs = strategy.cluster_resolver.cluster_spec().as_dict()
  return max(1, len(jobs.get('chief', [])) + len(jobs.get('worker', [])))


def check_divisible(global_batch_size, replicas, name='batch size'):
  """Raises DatasetError (one line) unless the batch splits evenly."""
  if global_batch_size % replicas:
    raise DatasetError(
        f'{name}={global_batch_size} is not divisible by the {replicas} '
        f'replicas: use a multiple of {replicas}.')


def build_distributed_dataset(source, global_batch_size, is_training,
                              strategy, config, split=None, max_examples=0,
                              with_index=False):
  """The per-replica pipeline distributed over `strategy`'s replicas.

  `split`, `max_examples` and `with_index` (eval only) are those of
  `build_input_fn`.
  """
  replicas = strategy.num_replicas_in_sync
  check_divisible(global_batch_size, replicas)
  input_fn = build_input_fn(source, global_batch_size, is_training, config,
                            num_replicas=replicas, split=split,
                            max_examples=max_examples, with_index=with_index)
  return strategy.distribute_datasets_from_function(input_fn)
