"""A dataset source for TFRecord files of encoded images:
`--dataset=tfrecord:<root>` (a local or gs:// directory).

A split is a file pattern under the root: `--train_split='train-*'` reads
`<root>/train-*`. A split without wildcards (`* ? [`) reads the files whose
names contain it, so the default splits `train` and `validation` find both
the ImageNet TPU layout (`train-00000-of-01024`) and TFDS's
(`imagenet2012-train.tfrecord-00000-of-01024`).

Records are `tf.train.Example`s. The features read (`Features`) default to
the TFDS names, `image` (encoded JPEG or PNG bytes) and `label` (int64),
then the ImageNet TPU ones, `image/encoded` and `image/class/label`,
whichever the first record has; labels are used as stored. Without a label
feature the source is unlabelled (`num_classes` 0, labels -1). Example ids
come from `id` (TFDS) or `image/filename` (ImageNet), else
`<file name>:<record index>`.

TFRecord files do not say how many examples they hold: the first use of a
split reads it once to count its records and find its largest label (one
parallel pass over the files; log lines say how long it took).
"""
import dataclasses
import time

from absl import logging
import tensorflow as tf

import image_folder

PREFIX = 'tfrecord:'
# Tried in order when no key is given: TFDS's names, then ImageNet's.
IMAGE_KEYS = ('image', 'image/encoded')
LABEL_KEYS = ('label', 'image/class/label')
ID_KEYS = ('id', 'image/filename')
_WILDCARDS = '*?['
# Files read at once when counting and reading.
_PARALLEL_FILES = 16


DatasetError = image_folder.DatasetError


@dataclasses.dataclass(frozen=True)
class Features:
  """Which features of a record to read ('' or 0: found from the data).

  image_key: encoded image bytes. label_key: int64 class. num_classes: the
  classes of the labels (0: one more than the largest label of
  `class_split`, which is read once to find it).
  """
  image_key: str = ''
  label_key: str = ''
  num_classes: int = 0
  class_split: str = 'train'


@dataclasses.dataclass(frozen=True)
class _Split:
  files: tuple
  num_examples: int
  max_label: int


class TfrecordSource:
  """TFRecord files under a root, behind the source interface of data.py."""

  # As TFDS sources: 32-px images are used whole at evaluation (the
  # original's CIFAR rule), so TFDS's own files read here behave as TFDS.
  fixed_size = True

  def __init__(self, root, features=Features()):
    self._root = root.rstrip('/') or '/'
    self.name = PREFIX + self._root
    self._features = features
    self._splits = {}  # split -> _Split, once read
    if not tf.io.gfile.isdir(self._root):
      raise DatasetError(
          f'TFRecord root {self._root} is not a directory: expected '
          f'{PREFIX}<directory of TFRecord files>.')
    self._keys = None
    self._num_classes = features.num_classes or None

  def pattern(self, split):
    """The file pattern `split` reads."""
    if not split or split.startswith('/') or '://' in split:
      where = split
    elif any(c in split for c in _WILDCARDS):
      where = f'{self._root}/{split}'
    else:
      where = f'{self._root}/*{split}*'
    return where

  def files(self, split):
    """The sorted files of `split`; DatasetError when none match."""
    pattern = self.pattern(split)
    try:
      files = sorted(f for f in tf.io.gfile.glob(pattern)
                     if not tf.io.gfile.isdir(f))
    except tf.errors.OpError as e:
      raise DatasetError(f'cannot list {pattern} '
                         f'({image_folder.clean_tf_message(e)}).') from None
    if not files:
      present = sorted(tf.io.gfile.listdir(self._root))[:4]
      raise DatasetError(
          f'split {split!r} matches no files ({pattern}); {self._root} '
          f'holds {", ".join(present) or "nothing"}'
          f'{", ..." if len(present) == 4 else ""}: pass a file pattern '
          "under it, e.g. --train_split='train-*'.")
    return files

  def keys(self, split):
    """(image key, label key or None, id key or None), found in the first
    record of the first split read (every split must have them)."""
    if self._keys is None:
      self._keys = self._find_keys(self.files(split)[0])
    return self._keys

  def _find_keys(self, path):
    try:
      record = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    except tf.errors.OpError as e:
      raise DatasetError(f'{path} is not a readable TFRecord file '
                         f'({image_folder.clean_tf_message(e)}).') from None
    if record is None:
      raise DatasetError(f'{path} holds no records: expected TFRecord files '
                         'of tf.train.Example.')
    try:
      example = tf.train.Example.FromString(record.numpy())
    except Exception:  # pylint: disable=broad-except
      raise DatasetError(f'the records of {path} are not tf.train.Example '
                         'protos.') from None
    present = dict(example.features.feature)
    shown = ', '.join(sorted(present)) or 'none'
    image_key = self._pick('image', self._features.image_key, IMAGE_KEYS,
                           present, path, shown)
    if present[image_key].WhichOneof('kind') != 'bytes_list':
      raise DatasetError(f'feature {image_key!r} of {path} is not bytes: '
                         'expected encoded JPEG or PNG images.')
    label_key = self._pick('label', self._features.label_key, LABEL_KEYS,
                           present, path, shown, required=False)
    if label_key and present[label_key].WhichOneof('kind') != 'int64_list':
      raise DatasetError(f'feature {label_key!r} of {path} is not int64: '
                         'expected integer class labels.')
    id_key = next((k for k in ID_KEYS if k in present and present[k]
                   .WhichOneof('kind') == 'bytes_list'), None)
    logging.info('%s: images from %r, labels from %r', self.name, image_key,
                 label_key or 'none (unlabelled)')
    return image_key, label_key, id_key

  @staticmethod
  def _pick(what, given, defaults, present, path, shown, required=True):
    if given:
      if given not in present:
        raise DatasetError(f'{what} feature {given!r} not in the records of '
                           f'{path}; they have {shown}.')
      return given
    found = next((k for k in defaults if k in present), None)
    if found is None and required:
      raise DatasetError(
          f'no {what} feature ({" or ".join(map(repr, defaults))}) in the '
          f'records of {path}; they have {shown}: pass '
          f'--tfrecord_{what}_key.')
    return found

  @property
  def num_classes(self):
    if self._num_classes is None:
      self._num_classes = self._split(self._features.class_split).max_label + 1
      logging.info('%s: %d classes (one more than the largest label of '
                   'split %r)', self.name, self._num_classes,
                   self._features.class_split)
    return self._num_classes

  @property
  def class_names(self):
    return [str(i) for i in range(self.num_classes)]

  def num_examples(self, split):
    """Records in `split` (read once to count them)."""
    info = self._split(split)
    if info.max_label >= self.num_classes:
      raise DatasetError(
          f'split {split!r} has label {info.max_label}, but there are '
          f'{self.num_classes} classes (from split '
          f'{self._features.class_split!r}): pass --tfrecord_num_classes.')
    return info.num_examples

  def _split(self, split):
    if split not in self._splits:
      files = self.files(split)
      _, label_key, _ = self.keys(split)
      start = time.time()
      logging.info('%s: counting the records of split %r (%d files, once)',
                   self.name, split, len(files))
      dataset = self._records(files, deterministic=False).batch(1024)
      if label_key:
        spec = {label_key: tf.io.FixedLenFeature([], tf.int64)}
        dataset = dataset.map(
            lambda _, records: tf.io.parse_example(records, spec)[label_key],
            num_parallel_calls=tf.data.AUTOTUNE)
      else:
        dataset = dataset.map(lambda _, records: -tf.ones_like(
            tf.strings.length(records), tf.int64))
      try:
        count, max_label = dataset.reduce(
            (tf.constant(0, tf.int64), tf.constant(-1, tf.int64)),
            lambda state, labels: (
                state[0] + tf.size(labels, tf.int64),
                tf.maximum(state[1], tf.reduce_max(
                    tf.concat([labels, [-1]], 0)))))
      except tf.errors.OpError as e:
        raise DatasetError(f'cannot read split {split!r} ({self.pattern(split)}'
                           f'): {image_folder.clean_tf_message(e)}.') from None
      if not count:
        raise DatasetError(f'split {split!r} ({self.pattern(split)}) holds no '
                           'records.')
      if label_key and not self._features.num_classes and max_label < 0:
        raise DatasetError(f'split {split!r} has no label >= 0 in '
                           f'{label_key!r}: pass --tfrecord_num_classes.')
      self._splits[split] = _Split(tuple(files), int(count), int(max_label))
      logging.info('%s: split %r has %d records (%.1f s)', self.name, split,
                   int(count), time.time() - start)
    return self._splits[split]

  def _records(self, files, deterministic=True, shuffle_seed=None,
               shuffle=False):
    """(id, serialised record) of every record of `files`, read
    `_PARALLEL_FILES` files at a time; `shuffle`: the files in a new order
    on every iteration (fixed by `shuffle_seed`)."""

    def read(path):
      name = tf.strings.regex_replace(path, r'^.*/', '')
      return tf.data.TFRecordDataset(path).enumerate().map(
          lambda i, record: (tf.strings.join(
              [name, tf.strings.as_string(i)], ':'), record))

    names = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle:
      names = names.shuffle(len(files), seed=shuffle_seed,
                            reshuffle_each_iteration=True)
    return names.interleave(read, cycle_length=_PARALLEL_FILES,
                            num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=deterministic)

  def ids(self, split):
    """The examples' ids in `as_dataset(split)` order (images not
    decoded)."""
    _, _, id_key = self.keys(split)
    dataset = self._records(self._split(split).files)
    if id_key:
      spec = {id_key: tf.io.FixedLenFeature([], tf.string)}
      dataset = dataset.map(
          lambda _, record: tf.io.parse_single_example(record, spec)[id_key])
    else:
      dataset = dataset.map(lambda record_id, _: record_id)
    return [i.decode() for i in dataset.as_numpy_iterator()]

  def as_dataset(self, split, shuffle_files=False, input_context=None,
                 seed=None):
    """Decoded examples of `split`: {'image': uint8 [H, W, 3], 'label':
    int64 (-1 unlabelled), 'id': string}.

    The order is fixed unless the files are shuffled without a seed. With
    several input pipelines each reads whole files of its own when there
    are at least as many files as pipelines, else its share of the records.
    """
    files = list(self._split(split).files)
    image_key, label_key, id_key = self.keys(split)
    pipelines = input_context.num_input_pipelines if input_context else 1
    by_record = pipelines > 1 and len(files) < pipelines
    if pipelines > 1 and not by_record:
      files = files[input_context.input_pipeline_id::pipelines]
    ordered = not shuffle_files or seed is not None
    dataset = self._records(files, deterministic=ordered, shuffle_seed=seed,
                            shuffle=shuffle_files)
    if by_record:
      dataset = dataset.shard(pipelines, input_context.input_pipeline_id)
    spec = {image_key: tf.io.FixedLenFeature([], tf.string)}
    if label_key:
      spec[label_key] = tf.io.FixedLenFeature([], tf.int64)
    if id_key:
      spec[id_key] = tf.io.FixedLenFeature([], tf.string)

    def decode(record_id, record):
      parsed = tf.io.parse_single_example(record, spec)
      return {
          'image': image_folder.decode(parsed[image_key]),
          'label': (parsed[label_key] if label_key else
                    tf.constant(-1, tf.int64)),
          'id': parsed[id_key] if id_key else record_id,
      }

    return dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=ordered)
