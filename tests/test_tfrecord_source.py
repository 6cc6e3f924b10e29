"""Tests of tfrecord_source: TFRecord files of encoded images as a dataset.

The reference for reading is TFDS itself: the prepared CIFAR-10 in
../shared/tfds is TFRecord files of tf.train.Example, read here by pattern
and compared with what tensorflow_datasets gives for the same files.
"""
import os

import numpy as np
import pytest
import tensorflow as tf

from config import Config
import data as data_lib
import tfrecord_source
from tfrecord_source import Features, TfrecordSource

SHARED = os.environ.get('SIMCLR_SHARED',
                        os.path.join(os.path.dirname(__file__), '..', '..',
                                     'shared'))
CIFAR = os.path.join(SHARED, 'tfds', 'cifar10', '3.0.2')


def _bytes(value):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def write_records(path, examples):
  """Writes tf.train.Examples of {key: bytes or int} to one TFRecord file."""
  with tf.io.TFRecordWriter(str(path)) as writer:
    for example in examples:
      feature = {k: _bytes(v) if isinstance(v, bytes) else _int(v)
                 for k, v in example.items()}
      writer.write(tf.train.Example(features=tf.train.Features(
          feature=feature)).SerializeToString())


def _jpeg(seed, size=(12, 10)):
  pixels = tf.random.stateless_uniform((*size, 3), [seed, 0], 0, 256,
                                       tf.int32)
  return tf.io.encode_jpeg(tf.cast(pixels, tf.uint8)).numpy()


@pytest.fixture(scope='module')
def imagenet_layout(tmp_path_factory):
  """ImageNet TPU layout: 3 train files of 4 records (labels 1..5, the
  background class 0 unused) and 1 validation file of 2."""
  root = tmp_path_factory.mktemp('imagenet')
  for f in range(3):
    write_records(root / f'train-0000{f}-of-00003', [
        {'image/encoded': _jpeg(4 * f + i), 'image/class/label': 1 + (
            4 * f + i) % 5, 'image/filename': f'n{f}_{i}.JPEG'.encode()}
        for i in range(4)])
  write_records(root / 'validation-00000-of-00001', [
      {'image/encoded': _jpeg(100 + i), 'image/class/label': 2 + i,
       'image/filename': f'val_{i}.JPEG'.encode()} for i in range(2)])
  (root / 'README.txt').write_text('not a record file')
  return root


def _read(source, split, **kwargs):
  return list(source.as_dataset(split, **kwargs).as_numpy_iterator())


def test_tfds_files_read_as_tfds_reads_them():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  source = TfrecordSource(CIFAR)
  assert source.keys('test') == ('image', 'label', 'id')
  assert (source.num_examples('train'), source.num_examples('test'),
          source.num_classes) == (10000, 10000, 10)
  ours = source.as_dataset('test').take(300)
  theirs = tfds.load('cifar10', split='test', data_dir=os.path.dirname(
      os.path.dirname(CIFAR))).take(300)
  for a, b in zip(ours.as_numpy_iterator(), theirs.as_numpy_iterator()):
    assert (a['id'], a['label']) == (b['id'], b['label'])
    np.testing.assert_array_equal(a['image'], b['image'])


def test_imagenet_keys_labels_and_ids(imagenet_layout):
  source = TfrecordSource(str(imagenet_layout))
  assert source.files('train') == [
      str(imagenet_layout / f'train-0000{f}-of-00003') for f in range(3)]
  assert source.num_examples('train') == 12
  # Labels as stored: 1..5, so 6 classes (0 is ImageNet's background).
  assert source.num_classes == 6
  assert source.keys('train') == ('image/encoded', 'image/class/label',
                                  'image/filename')
  examples = _read(source, 'validation-*')
  assert [(e['id'], e['label']) for e in examples] == [
      (b'val_0.JPEG', 2), (b'val_1.JPEG', 3)]
  decoded = tf.io.decode_jpeg(_jpeg(100)).numpy()
  np.testing.assert_array_equal(examples[0]['image'], decoded)
  train = _read(source, 'train')
  assert sorted(e['id'] for e in train) == sorted(
      f'n{f}_{i}.JPEG'.encode() for f in range(3) for i in range(4))
  assert sorted(e['label'] for e in train) == sorted(
      1 + k % 5 for k in range(12))


def test_given_keys_and_num_classes(imagenet_layout):
  source = TfrecordSource(str(imagenet_layout), Features(
      image_key='image/encoded', label_key='image/class/label',
      num_classes=1000))
  assert source.num_classes == 1000 and source.num_examples('train') == 12


@pytest.mark.parametrize('pipelines', [2, 5])
def test_input_pipelines_read_disjoint_shares(imagenet_layout, pipelines):
  """Fewer pipelines than files: whole files each; more: records each."""
  source = TfrecordSource(str(imagenet_layout))
  shares = [{e['id'] for e in _read(
      source, 'train', shuffle_files=True, seed=3,
      input_context=tf.distribute.InputContext(pipelines, i, 1))}
            for i in range(pipelines)]
  assert sum(len(s) for s in shares) == 12
  assert set().union(*shares) == {e['id'] for e in _read(source, 'train')}
  if pipelines == 2:  # files 0 and 2, then file 1
    assert sorted(len(s) for s in shares) == [4, 8]


def test_shuffled_files_keep_the_examples_and_follow_the_seed(
    imagenet_layout):
  source = TfrecordSource(str(imagenet_layout))
  first = [e['id'] for e in _read(source, 'train', shuffle_files=True,
                                  seed=1)]
  again = [e['id'] for e in _read(source, 'train', shuffle_files=True,
                                  seed=1)]
  assert first == again
  assert sorted(first) == sorted(e['id'] for e in _read(source, 'train'))


def test_records_without_labels_are_unlabelled(tmp_path):
  write_records(tmp_path / 'train-0', [{'image': _jpeg(i)} for i in range(3)])
  source = TfrecordSource(str(tmp_path))
  assert source.num_examples('train') == 3 and source.num_classes == 0
  examples = _read(source, 'train')
  assert [e['label'] for e in examples] == [-1, -1, -1]
  assert [e['id'] for e in examples] == [b'train-0:0', b'train-0:1',
                                         b'train-0:2']


def test_the_pipeline_and_the_schedule_use_the_split(imagenet_layout):
  cfg = Config(dataset=f'tfrecord:{imagenet_layout}', image_size=16,
               train_batch_size=4, train_epochs=2, use_tpu=False).validate()
  source = data_lib.source_for(cfg)
  images, labels = next(iter(data_lib.build_input_fn(source, 4, True,
                                                     cfg)()))
  assert images.shape == [4, 16, 16, 6] and labels['labels'].shape == [4, 6]
  import model as model_lib  # pylint: disable=import-outside-toplevel
  # 12 examples * 2 epochs // 4 + 1, the original's rule.
  assert model_lib.get_train_steps(source.num_examples('train'), cfg) == 7


def _error(root, split='train', **features):
  with pytest.raises(data_lib.DatasetError) as error:
    source = data_lib.get_source(f'tfrecord:{root}',
                                 tfrecord_features=Features(**features))
    source.num_examples(split)
    source.num_classes  # pylint: disable=pointless-statement
  message = str(error.value)
  assert '\n' not in message
  return message


def test_errors_are_one_line(imagenet_layout, tmp_path):
  assert _error(tmp_path / 'absent').startswith(
      f'TFRecord root {tmp_path / "absent"} is not a directory')
  assert _error(imagenet_layout, 'test').startswith(
      f"split 'test' matches no files ({imagenet_layout}/*test*); "
      f'{imagenet_layout} holds README.txt, train-00000-of-00003')
  assert _error(imagenet_layout, image_key='jpeg') == (
      "image feature 'jpeg' not in the records of "
      f'{imagenet_layout}/train-00000-of-00003; they have image/class/label,'
      ' image/encoded, image/filename.')
  write_records(tmp_path / 'train-0', [{'pixels': b'x', 'label': 1}])
  assert _error(tmp_path).startswith(
      "no image feature ('image' or 'image/encoded') in the records of")
  (tmp_path / 'garbage').mkdir()
  (tmp_path / 'garbage' / 'train-0').write_bytes(b'\x00' * 40)
  assert _error(tmp_path / 'garbage').startswith(
      f'{tmp_path}/garbage/train-0 is not a readable TFRecord file')
  # Validation labels beyond the classes found in train.
  (tmp_path / 'wide').mkdir()
  write_records(tmp_path / 'wide' / 'train-0', [{'image': b'', 'label': 1}])
  write_records(tmp_path / 'wide' / 'validation-0',
                [{'image': b'', 'label': 7}])
  assert _error(tmp_path / 'wide', 'validation') == (
      "split 'validation' has label 7, but there are 2 classes (from split "
      "'train'): pass --tfrecord_num_classes.")


def test_run_reads_the_flags(imagenet_layout, tmp_path, capsys):
  """run.py's tfrecord flags reach the source: a wrong key stops the run
  with one line and exit code 2 before any work."""
  from helpers import run_main_exit_code  # pylint: disable=import-outside-toplevel
  model_dir = tmp_path / 'model'
  code = run_main_exit_code([
      f'--dataset={tfrecord_source.PREFIX}{imagenet_layout}',
      '--use_tpu=False', '--tfrecord_label_key=label/x',
      f'--model_dir={model_dir}'])
  assert code == 2
  assert capsys.readouterr().err.strip() == (
      "error: label feature 'label/x' not in the records of "
      f'{imagenet_layout}/train-00000-of-00003; they have image/class/label,'
      ' image/encoded, image/filename.')
  assert not model_dir.exists()
