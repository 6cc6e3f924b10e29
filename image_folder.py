"""Dataset sources for a user's own images.

`--dataset=folder:/path/to/root`: labelled, one directory per class.
`--dataset=unlabelled:/path/to/root`: every image anywhere under the root,
without labels (pretraining, distillation); one split, `train`, whose
examples have label -1 (`num_classes` is 0). Directories and files whose
names start with '.' are skipped; the rest of this note holds for both.

Expected layout of a labelled folder (JPEG and PNG, extensions .jpg .jpeg
.png in any case):

    <root>/<split>/<class_name>/<image files>
    e.g. photos/train/cat/0001.jpg, photos/validation/dog/x.PNG

* Splits are the sub-directories of `<root>` that hold class directories
  (`train/`, `validation/`, `test/`, any name).
* Class names are the sorted union of the class directory names of all splits,
  so a class that is empty or absent in one split keeps the same index
  everywhere (labels must agree between pretraining, fine-tuning and eval).
  An empty class directory is reported with a warning, not an error.
* Names starting with '.' (`.ipynb_checkpoints/`, macOS `._x.jpg`) and files
  with other extensions are ignored and counted in an info line; directories
  nested inside a class directory are ignored with a warning (no recursion).

Construction lists the tree once and then decodes every image once with
`tf.io.decode_image` (the same op and arguments `as_dataset` uses) so that a
corrupt, truncated, empty or mislabelled file stops the run before training
starts instead of hours into it. That costs one full read and decode of the
data set (roughly 0.1-1 ms per small JPEG per core locally; reads from gs://
are the bulk of it), done on a thread pool. Corrupt files either fail the
construction (`on_corrupt='fail'`) or are dropped and reported
(`on_corrupt='skip'`); they are never dropped silently.

All paths go through `tf.io.gfile`, so `gs://` roots work like local ones.
"""
import concurrent.futures
import re
import time

from absl import logging
import tensorflow as tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# The one split of an unlabelled folder, the default --train_split.
UNLABELLED_SPLIT = 'train'
_ON_CORRUPT = ('fail', 'skip')
# Threads mostly wait on file reads (gs://) or run TF's decode kernels, which
# release the GIL, so more threads than cores still helps.
_VALIDATION_THREADS = 16


class DatasetError(ValueError):
  """A data-set problem, described in one user-facing line (of any source:
  data.DatasetError is this class)."""


def _join(*parts):
  return '/'.join(p.rstrip('/') for p in parts)


def _is_image_name(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


def clean_tf_message(message):
  """Returns the first line of a TF error (or its message) without
  op/function decorations."""
  message = getattr(message, 'message', message)
  line = str(message).strip().splitlines()[0] if str(message).strip() else ''
  line = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', line)
  line = re.sub(r'\s*\[Op:[^\]]*\]\s*$', '', line)
  return line.strip() or 'unknown error'


def decode(contents):
  """Decodes encoded image bytes to uint8 [H, W, 3].

  `expand_animations=False` keeps the rank at 3 for any format decode_image
  accepts; channels=3 turns grayscale and RGBA into RGB.
  """
  image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8,
                             expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _check_file(path):
  """Returns None if `path` decodes as an image, else the reason it does not."""
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      contents = f.read()
  except (tf.errors.OpError, OSError) as e:
    return f'unreadable ({clean_tf_message(e)})'
  if not contents:
    return 'empty file (0 bytes)'
  try:
    image = decode(contents)
  except tf.errors.OpError as e:
    return f'not a decodable image ({clean_tf_message(e)})'
  if image.shape[0] == 0 or image.shape[1] == 0:
    return f'image has no pixels (shape {image.shape})'
  return None


class ImageFolderBuilder:
  """Images in `<root>/<split>/<class_name>/` (or, unlabelled, anywhere
  under `<root>`), served like a TFDS builder.

  Attributes:
    name: 'folder:<root>' ('unlabelled:<root>').
    class_names: sorted class directory names; a label is an index into it
      (unlabelled: none, and every label is -1).
    num_classes: len(class_names).
    splits: sorted split directory names (unlabelled: ['train']).
    skipped: (path, reason) for every corrupt or unreadable image found
      (filled with on_corrupt='skip'; with 'fail' construction raises).
  """

  def __init__(self, root, on_corrupt='fail', labelled=True):
    """Scans and validates the tree.

    Args:
      root: local or gs:// directory holding one directory per split
        (unlabelled: images at any depth).
      on_corrupt: 'fail' raises DatasetError on the first corrupt image (in
        split, class, file-name order); 'skip' drops corrupt images, logging
        one warning per file and a summary.
      labelled: False: every image under root, recursively, label -1.

    Raises:
      DatasetError: root missing or not a directory, no split directories, a
        split without any (readable) image, a corrupt image with
        on_corrupt='fail'.
      ValueError: on_corrupt is not 'fail' or 'skip'.
    """
    if on_corrupt not in _ON_CORRUPT:
      raise ValueError(f'on_corrupt={on_corrupt!r}: expected one of '
                       f'{", ".join(_ON_CORRUPT)}')
    root = str(root)
    self._root = root.rstrip('/') or '/'
    self._on_corrupt = on_corrupt
    self._labelled = labelled
    self.skipped = []
    # split -> list of (relative path, class name), sorted by class then file
    # (unlabelled: by path, class None).
    files, class_names = self._scan() if labelled else self._scan_unlabelled()
    self._class_names = class_names
    index = {c: i for i, c in enumerate(class_names)}
    index[None] = -1
    self._examples = {
        split: [(rel, index[c]) for rel, c in entries]
        for split, entries in self._validate(files).items()
    }
    logging.info('%s: %d classes; %s', self.name, self.num_classes, ', '.join(
        f'{s}: {len(e)} images' for s, e in self._examples.items()))

  # --- public API -----------------------------------------------------------

  @property
  def name(self):
    return f'{"folder" if self._labelled else "unlabelled"}:{self._root}'

  @property
  def class_names(self):
    return list(self._class_names)

  @property
  def num_classes(self):
    return len(self._class_names)

  @property
  def splits(self):
    return list(self._examples)

  def num_examples(self, split):
    """Number of images `as_dataset(split)` yields (corrupt ones excluded).

    Raises:
      DatasetError: the split does not exist.
    """
    return len(self._split_examples(split))

  def as_dataset(self, split, shuffle_files=False, input_context=None,
                 seed=None):
    """Decoded images of one split.

    Args:
      split: a name in `splits`.
      shuffle_files: shuffle the file list of this input pipeline, anew on
        every iteration. False: sorted by class, then file name.
      input_context: optional tf.distribute.InputContext; each input pipeline
        gets the disjoint shard `shard(num_input_pipelines,
        input_pipeline_id)` of the file list, taken before shuffling and
        decoding so no pipeline reads another's files.
      seed: optional seed of the shuffle (the same seed, the same orders).

    Returns:
      tf.data.Dataset of {'image': uint8 [H, W, 3] (sizes vary),
      'label': int64 scalar, 'id': string path relative to root}.

    Raises:
      DatasetError: the split does not exist.
    """
    examples = self._split_examples(split)
    ids = [rel for rel, _ in examples]
    ds = tf.data.Dataset.from_tensor_slices({
        'id': tf.constant(ids, tf.string),
        'label': tf.constant([label for _, label in examples], tf.int64),
    })
    if input_context is not None and input_context.num_input_pipelines > 1:
      ds = ds.shard(input_context.num_input_pipelines,
                    input_context.input_pipeline_id)
    if shuffle_files:
      # The whole (sharded) list fits in the buffer: file names are small.
      ds = ds.shuffle(max(1, len(ids)), seed=seed,
                      reshuffle_each_iteration=True)
    prefix = self._root.rstrip('/') + '/'

    def load(example):
      contents = tf.io.read_file(tf.strings.join([prefix, example['id']]))
      return {'image': decode(contents), 'label': example['label'],
              'id': example['id']}

    # Order only matters when the caller asked for a deterministic one.
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=not shuffle_files or seed is not None)

  def ids(self, split):
    """Paths relative to the root, in `as_dataset(split)` order."""
    return [rel for rel, _ in self._split_examples(split)]

  def write_class_names(self, directory):
    """Writes `<directory>/class_names.txt`, one name per line, index order.

    Returns:
      The path written.
    """
    tf.io.gfile.makedirs(directory)
    path = _join(str(directory), 'class_names.txt')
    with tf.io.gfile.GFile(path, 'w') as f:
      f.write(''.join(f'{c}\n' for c in self._class_names))
    return path

  # --- scanning -------------------------------------------------------------

  def _split_examples(self, split):
    if split not in self._examples:
      raise DatasetError(
          f'split {split!r} not found under {self._root}: available splits '
          f'are {", ".join(self._examples)}')
    return self._examples[split]

  def _listdir(self, path):
    # GCS lists sub-directories with a trailing '/'.
    return sorted(n.rstrip('/') for n in tf.io.gfile.listdir(path))

  def _subdirs(self, path, hidden):
    names = []
    for n in self._listdir(path):
      if n.startswith('.'):
        if tf.io.gfile.isdir(_join(path, n)):
          hidden.append(_join(path, n))
        continue
      if tf.io.gfile.isdir(_join(path, n)):
        names.append(n)
    return names

  def _check_root(self, layout):
    root = self._root
    if not tf.io.gfile.exists(root):
      raise DatasetError(f'dataset root {root} does not exist: expected a '
                         f'directory {layout}')
    if not tf.io.gfile.isdir(root):
      raise DatasetError(f'dataset root {root} is not a directory: expected '
                         f'{layout}')

  def _scan_unlabelled(self):
    """Every image file under root, at any depth; ({'train': [(rel, None)]},
    [])."""
    root = self._root
    self._check_root('holding images (at any depth)')
    images, ignored, hidden = [], 0, 0
    for directory, subdirs, names in tf.io.gfile.walk(root):
      # Pruned in place: walk() does not descend into hidden directories.
      hidden += sum(d.startswith('.') for d in subdirs)
      subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
      prefix = directory[len(root):].strip('/')
      for name in names:
        if not name.startswith('.') and _is_image_name(name):
          images.append(_join(prefix, name) if prefix else name)
        else:
          ignored += 1
    if ignored or hidden:
      logging.info('%s: ignoring %d files that are hidden or not %s and %d '
                   'hidden directories', self.name, ignored,
                   ' '.join(IMAGE_EXTENSIONS), hidden)
    if not images:
      raise DatasetError(f'no images under {root}: expected files with '
                         f'extension {", ".join(IMAGE_EXTENSIONS)} at any '
                         'depth')
    return {UNLABELLED_SPLIT: [(rel, None) for rel in sorted(images)]}, []

  def _scan(self):
    """Lists split/class/file names; returns ({split: [(rel, cls)]}, classes)."""
    root = self._root
    self._check_root('<root>/<split>/<class_name>/<images>')
    hidden = []
    class_dirs = {}  # split -> class names
    not_splits = []
    for split in self._subdirs(root, hidden):
      classes = self._subdirs(_join(root, split), hidden)
      if classes:
        class_dirs[split] = classes
      else:
        not_splits.append(split)
    if not class_dirs:
      hint = ''
      if not_splits:
        hint = (f' ({", ".join(not_splits[:3])} hold no sub-directories: if '
                'they are classes, move them into a split such as train/)')
      raise DatasetError(
          f'no split directories under {root}: expected '
          f'<root>/<split>/<class_name>/<images>, e.g. {root}/train/cat/1.jpg'
          + hint)
    for split in not_splits:
      logging.info('%s: ignoring %s (no class sub-directories, not a split)',
                   self.name, _join(root, split))
    if hidden:
      logging.info('%s: ignoring %d hidden directories, e.g. %s', self.name,
                   len(hidden), hidden[0])

    class_names = sorted(set().union(*class_dirs.values()))
    bad = [c for c in class_names if '\n' in c or '\r' in c]
    if bad:
      raise DatasetError(f'class directory name {bad[0]!r} under {root} '
                         'contains a line break: expected one-line names')

    files = {}
    for split, classes in class_dirs.items():
      entries = []
      ignored = []
      for cls in classes:
        class_dir = _join(root, split, cls)
        images = []
        for n in self._listdir(class_dir):
          # Decided by name first: one isdir() per file would be slow on GCS.
          if not n.startswith('.') and _is_image_name(n):
            images.append(n)
          elif tf.io.gfile.isdir(_join(class_dir, n)):
            logging.warning('%s: ignoring directory %s inside class %r '
                            '(sub-directories of a class are not read)',
                            self.name, _join(class_dir, n), cls)
          else:
            ignored.append(_join(class_dir, n))
        if not images:
          logging.warning('%s: class directory %s has no images (%s); class '
                          '%r keeps its index', self.name, class_dir,
                          ' '.join(IMAGE_EXTENSIONS), cls)
        entries.extend((f'{split}/{cls}/{n}', cls) for n in images)
      if ignored:
        logging.info('%s: ignoring %d files in split %r that are hidden or '
                     'not %s, e.g. %s', self.name, len(ignored), split,
                     ' '.join(IMAGE_EXTENSIONS), ignored[0])
      missing = sorted(set(class_names) - set(classes))
      if missing:
        logging.info('%s: split %r has no directory for %d classes (e.g. %r); '
                     'they keep their indices', self.name, split,
                     len(missing), missing[0])
      if not entries:
        raise DatasetError(
            f'split {split!r} under {root} has no images: expected '
            f'{_join(root, split)}/<class_name>/<file> with extension '
            f'{", ".join(IMAGE_EXTENSIONS)}')
      files[split] = entries
    return files, class_names

  def _validate(self, files):
    """Decodes every file once; drops or fails on the corrupt ones."""
    ordered = [(split, rel, cls) for split, entries in files.items()
               for rel, cls in entries]
    logging.info('%s: checking %d images (decoding each once)...', self.name,
                 len(ordered))
    start = time.time()
    bad = set()
    with concurrent.futures.ThreadPoolExecutor(_VALIDATION_THREADS) as pool:
      results = pool.map(_check_file,
                         [_join(self._root, rel) for _, rel, _ in ordered])
      try:
        # map() yields in submission order, so the first bad file reported is
        # the first in split, class, file-name order whatever the scheduling.
        for (split, rel, _), reason in zip(ordered, results):
          if reason is None:
            continue
          path = _join(self._root, rel)
          if self._on_corrupt == 'fail':
            raise DatasetError(
                f'corrupt image {path}: {reason}; expected a JPEG or PNG file '
                "(remove it, or skip corrupt files with on_corrupt='skip')")
          logging.warning('%s: skipping corrupt image %s: %s', self.name,
                          path, reason)
          self.skipped.append((path, reason))
          bad.add(rel)
      except DatasetError:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    logging.info('%s: checked %d images in %.1f s', self.name, len(ordered),
                 time.time() - start)
    if self.skipped:
      logging.warning('%s: skipped %d corrupt or unreadable images of %d',
                      self.name, len(self.skipped), len(ordered))
    kept = {}
    for split, entries in files.items():
      kept[split] = [(rel, cls) for rel, cls in entries if rel not in bad]
      if not kept[split]:
        raise DatasetError(
            f'split {split!r} under {self._root} has no readable images: all '
            f'{len(entries)} are corrupt (first: '
            f'{_join(self._root, entries[0][0])})')
    return kept
