"""Tests of image_folder: scanning, validation, decoding, sharding, errors."""
import logging

import pytest
import tensorflow as tf

import image_folder
from image_folder import DatasetError, ImageFolderBuilder

# relative path -> (height, width, channels) of the image written there.
GOOD = {
    'train/cat/a.jpg': (20, 30, 3),
    'train/cat/b.PNG': (16, 16, 1),    # grayscale, upper-case extension
    'train/cat/c.jpeg': (10, 12, 3),
    'train/dog/d.png': (8, 9, 4),      # RGBA
    'train/dog/e.JPG': (25, 5, 1),     # grayscale JPEG
    'validation/cat/f.jpg': (14, 7, 3),
    'test/bird/g.png': (6, 6, 3),
}
CLASSES = ['bird', 'cat', 'dog', 'emu']
BAD = ('train/dog/bad.jpg', 'validation/cat/zero.png')


def _write(path, data):
  tf.io.gfile.makedirs(str(path.parent))
  with tf.io.gfile.GFile(str(path), 'wb') as f:
    f.write(data)


def _encode(rel, shape):
  pixels = tf.random.stateless_uniform(shape, [1, len(rel)], 0, 256, tf.int32)
  pixels = tf.cast(pixels, tf.uint8)
  if rel.lower().endswith('.png'):
    return tf.io.encode_png(pixels).numpy()
  return tf.io.encode_jpeg(pixels).numpy()


def make_tree(root, corrupt=False):
  """Writes GOOD, an empty class dir, a non-image file and maybe BAD."""
  for rel, shape in GOOD.items():
    _write(root / rel, _encode(rel, shape))
  (root / 'train' / 'emu').mkdir()           # empty class
  _write(root / 'train' / 'cat' / 'notes.txt', b'ignored')
  (root / '.ipynb_checkpoints' / 'junk').mkdir(parents=True)  # ignored
  if corrupt:
    _write(root / BAD[0], b'definitely not an image ' * 8)
    _write(root / BAD[1], b'')
  return root


def _read(builder, split, **kwargs):
  return list(builder.as_dataset(split, **kwargs).as_numpy_iterator())


@pytest.fixture
def tree(tmp_path):
  return make_tree(tmp_path / 'data')


def test_classes_splits_and_counts(tree, caplog):
  with caplog.at_level(logging.INFO):
    b = ImageFolderBuilder(str(tree))
  assert b.name == f'folder:{tree}'
  assert b.class_names == CLASSES
  assert b.num_classes == 4
  assert b.splits == ['test', 'train', 'validation']
  assert b.num_examples('train') == 5
  assert b.num_examples('validation') == 1
  assert b.num_examples('test') == 1
  assert b.skipped == []
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert any('emu' in w and 'no images' in w for w in warnings), warnings


def test_examples_labels_shapes_and_order(tree):
  b = ImageFolderBuilder(tree)
  ds = b.as_dataset('train')
  assert ds.element_spec['image'].shape.as_list() == [None, None, 3]
  assert ds.element_spec['image'].dtype == tf.uint8
  assert ds.element_spec['label'].dtype == tf.int64
  assert ds.element_spec['label'].shape.rank == 0
  assert ds.element_spec['id'].dtype == tf.string
  examples = _read(b, 'train')
  ids = [e['id'].decode() for e in examples]
  # Sorted by class, then file name (code-point order: upper case first).
  assert ids == ['train/cat/a.jpg', 'train/cat/b.PNG', 'train/cat/c.jpeg',
                 'train/dog/d.png', 'train/dog/e.JPG']
  for e in examples:
    rel = e['id'].decode()
    h, w, _ = GOOD[rel]
    assert e['image'].shape == (h, w, 3)
    assert e['image'].dtype == 'uint8'
    assert e['label'] == CLASSES.index(rel.split('/')[1])
  # Indices come from the union of classes, also in a split lacking some.
  (val,) = _read(b, 'validation')
  assert val['label'] == CLASSES.index('cat')
  (test,) = _read(b, 'test')
  assert test['label'] == CLASSES.index('bird')


def test_shuffle_files_keeps_the_set(tree):
  b = ImageFolderBuilder(tree)
  ids = sorted(e['id'] for e in _read(b, 'train', shuffle_files=True))
  assert ids == sorted(e['id'] for e in _read(b, 'train'))


def test_fail_names_first_corrupt_file(tmp_path):
  root = make_tree(tmp_path / 'data', corrupt=True)
  with pytest.raises(DatasetError) as err:
    ImageFolderBuilder(root, on_corrupt='fail')
  message = str(err.value)
  assert '\n' not in message
  assert str(root / BAD[0]) in message  # first in split/class/name order
  assert 'not a decodable image' in message


def test_fail_on_truncated_jpeg(tmp_path):
  root = tmp_path / 'data'
  data = _encode('x.jpg', (40, 40, 3))
  _write(root / 'train' / 'a' / 'x.jpg', data[:len(data) // 2])
  with pytest.raises(DatasetError, match='x.jpg'):
    ImageFolderBuilder(root)


def test_skip_drops_and_reports_corrupt_files(tmp_path, caplog):
  root = make_tree(tmp_path / 'data', corrupt=True)
  with caplog.at_level(logging.WARNING):
    b = ImageFolderBuilder(root, on_corrupt='skip')
  skipped = dict(b.skipped)
  assert set(skipped) == {str(root / r) for r in BAD}
  assert 'empty file' in skipped[str(root / BAD[1])]
  assert 'not a decodable image' in skipped[str(root / BAD[0])]
  assert b.num_examples('train') == 5
  assert b.num_examples('validation') == 1
  ids = {e['id'].decode() for s in b.splits for e in _read(b, s)}
  assert ids == set(GOOD)
  warnings = [r.getMessage() for r in caplog.records]
  for rel in BAD:
    assert sum(str(root / rel) in w for w in warnings) == 1
  assert any('skipped 2 corrupt' in w for w in warnings)


def test_split_of_only_corrupt_files_is_an_error(tmp_path):
  root = tmp_path / 'data'
  _write(root / 'train' / 'a' / 'x.png', b'')
  with pytest.raises(DatasetError, match="split 'train'.*no readable images"):
    ImageFolderBuilder(root, on_corrupt='skip')


def test_missing_root(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(DatasetError) as err:
    ImageFolderBuilder(missing)
  assert str(missing) in str(err.value) and '\n' not in str(err.value)


def test_no_split_directories(tmp_path):
  root = tmp_path / 'flat'
  _write(root / 'cat' / 'a.png', _encode('a.png', (4, 4, 3)))
  with pytest.raises(DatasetError) as err:
    ImageFolderBuilder(root)
  message = str(err.value)
  assert 'no split directories' in message and str(root) in message
  assert '\n' not in message


def test_split_without_images(tmp_path):
  root = tmp_path / 'data'
  _write(root / 'train' / 'a' / 'x.png', _encode('x.png', (4, 4, 3)))
  (root / 'test' / 'a').mkdir(parents=True)
  with pytest.raises(DatasetError, match="split 'test'.*has no images"):
    ImageFolderBuilder(root)


def test_missing_split(tree):
  b = ImageFolderBuilder(tree)
  for call in (b.num_examples, b.as_dataset):
    with pytest.raises(DatasetError) as err:
      call('valid')
    message = str(err.value)
    assert "'valid'" in message and str(tree) in message
    assert 'test, train, validation' in message and '\n' not in message


def test_bad_on_corrupt_value(tree):
  with pytest.raises(ValueError, match='on_corrupt'):
    ImageFolderBuilder(tree, on_corrupt='ignore')


def test_write_class_names(tree, tmp_path):
  b = ImageFolderBuilder(tree)
  path = b.write_class_names(str(tmp_path / 'out' / 'model'))
  assert path == str(tmp_path / 'out' / 'model' / 'class_names.txt')
  with tf.io.gfile.GFile(path) as f:
    assert f.read().splitlines() == CLASSES


def test_sharding_by_input_pipeline(tree):
  b = ImageFolderBuilder(tree)
  shards = []
  for i in range(2):
    context = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=i, num_replicas_in_sync=2)
    shards.append({e['id'].decode() for e in
                   _read(b, 'train', input_context=context,
                         shuffle_files=True)})
  assert shards[0] and shards[1]
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == {r for r in GOOD if r.startswith('train/')}


def test_error_messages_drop_tf_decorations():
  raw = ('{{function_node __wrapped__DecodeImage_device_/job:localhost/'
         'replica:0/task:0/device:CPU:0}} Input is empty. [Op:DecodeImage]')
  assert image_folder.clean_tf_message(raw) == 'Input is empty.'


def test_run_writes_class_names_to_model_dir(tree, tmp_path):
  """run.py on a folder: <model_dir>/class_names.txt lists the classes in
  label order, next to the run's checkpoint."""
  import config as config_lib  # pylint: disable=import-outside-toplevel
  import training  # pylint: disable=import-outside-toplevel
  model_dir = tmp_path / 'model'
  training.run(config_lib.Config(
      dataset=f'folder:{tree}', train_mode='finetune', mode='train',
      resnet_depth=18, width_multiplier=0.125, image_size=32,
      train_batch_size=2, train_steps=1, eval_split='validation',
      model_dir=str(model_dir), use_tpu=False).validate())
  assert (model_dir / 'class_names.txt').read_text().splitlines() == CLASSES
  assert (model_dir / 'ckpt-1.index').exists()


# --- unlabelled folders: images at any depth, no classes ---------------------

UNLABELLED = {
    'a.jpg': (9, 9, 3),
    'holiday/b.png': (12, 8, 3),
    'holiday/day2/c.JPEG': (7, 11, 1),
    'z/d.png': (6, 6, 4),
}


@pytest.fixture
def unlabelled_tree(tmp_path):
  root = tmp_path / 'photos'
  for rel, shape in UNLABELLED.items():
    _write(root / rel, _encode(rel, shape))
  _write(root / '.thumbnails' / 'e.jpg', _encode('e.jpg', (4, 4, 3)))
  _write(root / 'holiday' / '._b.png', b'macOS metadata')
  _write(root / 'holiday' / 'notes.txt', b'ignored')
  return root


def test_unlabelled_folder_reads_every_image_at_any_depth(unlabelled_tree):
  b = ImageFolderBuilder(unlabelled_tree, labelled=False)
  assert b.name == f'unlabelled:{unlabelled_tree}'
  assert (b.splits, b.num_classes, b.class_names) == (['train'], 0, [])
  examples = _read(b, 'train')
  assert [e['id'].decode() for e in examples] == sorted(UNLABELLED)
  assert [e['label'] for e in examples] == [-1] * len(UNLABELLED)
  assert [e['image'].shape for e in examples] == [
      (h, w, 3) for h, w, _ in (UNLABELLED[r] for r in sorted(UNLABELLED))]


def test_unlabelled_folder_errors(tmp_path):
  (tmp_path / 'empty' / 'sub').mkdir(parents=True)
  _write(tmp_path / 'empty' / 'sub' / 'x.txt', b'text')
  with pytest.raises(DatasetError, match=r'^no images under .*empty: '
                     r'expected files with extension \.jpg, \.jpeg, \.png '
                     'at any depth$'):
    ImageFolderBuilder(tmp_path / 'empty', labelled=False)
  with pytest.raises(DatasetError, match='does not exist'):
    ImageFolderBuilder(tmp_path / 'absent', labelled=False)
  _write(tmp_path / 'one' / 'bad.jpg', b'not an image')
  _write(tmp_path / 'one' / 'good.png', _encode('good.png', (5, 5, 3)))
  with pytest.raises(DatasetError, match=r'^corrupt image .*one/bad\.jpg'):
    ImageFolderBuilder(tmp_path / 'one', labelled=False)
  kept = ImageFolderBuilder(tmp_path / 'one', on_corrupt='skip',
                            labelled=False)
  assert kept.num_examples('train') == 1


def test_runs_that_need_labels_stop_on_an_unlabelled_folder(unlabelled_tree):
  import config as config_lib  # pylint: disable=import-outside-toplevel
  import data  # pylint: disable=import-outside-toplevel
  source = data.get_source(f'unlabelled:{unlabelled_tree}')
  cases = {
      'pretrain': dict(),
      'finetune': dict(train_mode='finetune'),
      'knn': dict(lineareval_while_pretraining=False, knn_monitor_steps=5),
  }
  messages = {}
  for name, changes in cases.items():
    with pytest.raises(data.DatasetError) as error:
      data.check_labelled(source, config_lib.Config(**changes))
    messages[name] = str(error.value)
  head = f'dataset unlabelled:{unlabelled_tree} has no labels, but '
  assert messages == {
      'pretrain': head + '--lineareval_while_pretraining (on by default) '
                  'trains a linear head on them: pass '
                  '--lineareval_while_pretraining=False.',
      'finetune': head + '--train_mode=finetune trains a classifier on them.',
      'knn': head + 'the kNN monitor evaluates with them: pass '
             '--knn_monitor_steps=0.',
  }
  data.check_labelled(source, config_lib.Config(
      lineareval_while_pretraining=False))


def test_pretraining_on_an_unlabelled_folder(unlabelled_tree, tmp_path):
  """Two steps of pretraining on 4 unlabelled images of different sizes
  (a non-finite loss would stop it): a checkpoint with the projection head
  and no supervised head."""
  import config as config_lib  # pylint: disable=import-outside-toplevel
  import training  # pylint: disable=import-outside-toplevel
  model_dir = tmp_path / 'model'
  training.run(config_lib.Config(
      dataset=f'unlabelled:{unlabelled_tree}', lineareval_while_pretraining=
      False, resnet_depth=18, width_multiplier=0.125, image_size=16,
      train_batch_size=4, train_steps=2, use_blur=False, seed=0,
      model_dir=str(model_dir), use_tpu=False).validate())
  reader = tf.train.load_checkpoint(str(model_dir / 'ckpt-2'))
  keys = reader.get_variable_to_shape_map()
  assert not [k for k in keys if 'head_supervised' in k]
  assert [k for k in keys if k.startswith('model/_projection_head')]
  assert not (model_dir / 'class_names.txt').exists()
