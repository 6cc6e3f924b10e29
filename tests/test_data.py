"""Input pipelines: shapes, dtypes, per-replica batches, eval coverage,
dataset resolution and its errors."""
import numpy as np
import pytest
import tensorflow as tf

import conftest
import data as data_lib
import data_util
from config import Config

TINY = dict(image_size=32, train_batch_size=16, eval_batch_size=48,
            dataset='shapes10', train_split='train', eval_split='test',
            color_jitter_strength=0.5)


def first_batch(dataset):
  return next(iter(dataset))


def test_cifar10_from_shared_tfds_has_the_right_counts():
  tfds_dir = conftest.require(conftest.SHARED / 'tfds')
  source = data_lib.get_source('cifar10', str(tfds_dir))
  assert source.num_examples('train') == 10000
  assert source.num_examples('test') == 10000
  assert source.num_classes == 10 and source.class_names[0] == 'airplane'


def test_missing_and_unknown_datasets_give_one_line(tmp_path):
  with pytest.raises(data_lib.DatasetError) as error:
    data_lib.get_source('cifar100', str(tmp_path))
  message = str(error.value)
  assert 'cifar100' in message and str(tmp_path) in message
  assert 'tfds build' in message and '\n' not in message
  with pytest.raises(data_lib.DatasetError) as error:
    data_lib.get_source('no_such_dataset_xyz', str(tmp_path))
  assert 'no_such_dataset_xyz' in str(error.value)
  with pytest.raises(data_lib.DatasetError) as error:
    data_lib.get_source(f'folder:{tmp_path}/absent')
  assert 'absent' in str(error.value)


@pytest.fixture(scope='module')
def shapes(shapes10_dir):
  return data_lib.get_source('shapes10', str(shapes10_dir))


def test_batched_augmentation_where_images_are_small_and_one_size():
  cfg = Config(**TINY)
  assert data_lib.use_batched_augmentation(cfg, tf.TensorShape([32, 32, 3]))
  assert not data_lib.use_batched_augmentation(
      cfg.replace(batched_augmentation=False), tf.TensorShape([32, 32, 3]))
  # Images of varying size (folders, ImageNet) go one at a time.
  assert not data_lib.use_batched_augmentation(
      cfg, tf.TensorShape([None, None, 3]))
  big = data_lib.BATCHED_AUGMENTATION_MAX_SIZE + 1
  assert not data_lib.use_batched_augmentation(
      cfg, tf.TensorShape([big, big, 3]))
  assert not data_lib.use_batched_augmentation(
      cfg.replace(image_size=big), tf.TensorShape([32, 32, 3]))


BATCHED = pytest.mark.parametrize('batched', [True, False],
                                  ids=['batched', 'per_example'])


@pytest.fixture
def augment_calls(monkeypatch):
  """Names of the data_util augmentation functions a pipeline traced."""
  calls = []
  for name in ('preprocess_image', 'batch_preprocess_for_train',
               'batch_preprocess_two_views'):
    original = getattr(data_util, name)

    def spy(*args, _name=name, _original=original, **kwargs):
      calls.append(_name)
      return _original(*args, **kwargs)
    monkeypatch.setattr(data_util, name, spy)
  return calls


@BATCHED
def test_pretrain_batches_stack_two_different_views(shapes, batched,
                                                    augment_calls):
  cfg = Config(train_mode='pretrain', batched_augmentation=batched, **TINY)
  images, labels = first_batch(
      data_lib.build_input_fn(shapes, 16, True, cfg)())
  if batched:
    assert 'batch_preprocess_two_views' in augment_calls
    assert 'preprocess_image' not in augment_calls
  else:
    assert set(augment_calls) == {'preprocess_image'}
  assert images.shape == [16, 32, 32, 6] and images.dtype == tf.float32
  assert 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1
  assert labels['labels'].shape == [16, 10]
  np.testing.assert_array_equal(tf.reduce_sum(labels['labels'], 1), 1)
  np.testing.assert_array_equal(labels['mask'], 1)
  view1, view2 = images[..., :3], images[..., 3:]
  assert (np.abs(view1 - view2).max(axis=(1, 2, 3)) > 1e-2).all()


@BATCHED
def test_finetune_batches_have_one_view(shapes, batched, augment_calls):
  cfg = Config(train_mode='finetune', batched_augmentation=batched, **TINY)
  images, labels = first_batch(
      data_lib.build_input_fn(shapes, 16, True, cfg)())
  assert set(augment_calls) == {'batch_preprocess_for_train' if batched
                                else 'preprocess_image'}
  assert images.shape == [16, 32, 32, 3]
  assert labels['labels'].shape == [16, 10] and labels['mask'].shape == [16]


@BATCHED
def test_two_replicas_get_half_the_global_batch_each(shapes, mirrored2,
                                                     batched):
  cfg = Config(train_mode='pretrain', batched_augmentation=batched, **TINY)
  dataset = data_lib.build_distributed_dataset(shapes, 16, True, mirrored2,
                                               cfg)
  images, labels = first_batch(dataset)
  local = mirrored2.experimental_local_results(images)
  assert [x.shape for x in local] == [[8, 32, 32, 6]] * 2
  assert [x.shape for x in mirrored2.experimental_local_results(
      labels['labels'])] == [[8, 10]] * 2
  with pytest.raises(data_lib.DatasetError, match='not divisible'):
    data_lib.build_distributed_dataset(shapes, 15, True, mirrored2, cfg)


def _eval_totals(batches, num_classes=10):
  """(examples, per-class counts, pixel sum) over the mask-1 rows."""
  count, classes, pixels = 0, np.zeros(num_classes), 0.
  for images, labels in batches:
    mask = labels['mask'].numpy()
    count += int(mask.sum())
    classes += (labels['labels'].numpy() * mask[:, None]).sum(0)
    pixels += float((images.numpy().sum((1, 2, 3)) * mask).sum())
  return count, classes, pixels


def _reference_totals(source, cfg):
  classes, pixels = np.zeros(10), 0.
  for example in source.as_dataset('test'):
    image = data_util.preprocess_image(example['image'], 32, 32,
                                       is_training=False, test_crop=False)
    classes[int(example['label'])] += 1
    pixels += float(tf.reduce_sum(image))
  return source.num_examples('test'), classes, pixels


@pytest.mark.parametrize('replicas', [1, 2])
def test_eval_counts_every_example_exactly_once(shapes, mirrored2, replicas):
  cfg = Config(train_mode='finetune', **TINY)
  num = shapes.num_examples('test')
  steps = data_lib.eval_steps(num, 48, replicas)
  assert steps == -(-num // 48)
  if replicas == 1:
    batches = list(data_lib.build_input_fn(shapes, 48, False, cfg)())
  else:
    dataset = data_lib.build_distributed_dataset(shapes, 48, False,
                                                 mirrored2, cfg)
    batches = []
    iterator = iter(dataset)
    for _ in range(steps):  # exactly the steps run.py runs
      images, labels = next(iterator)
      for x, y, m in zip(*(mirrored2.experimental_local_results(t) for t in
                           (images, labels['labels'], labels['mask']))):
        assert x.shape == [24, 32, 32, 3]
        batches.append((x, {'labels': y, 'mask': m}))
    with pytest.raises(StopIteration):
      next(iterator)
  assert len(batches) == steps * replicas
  count, classes, pixels = _eval_totals(batches)
  ref_count, ref_classes, ref_pixels = _reference_totals(shapes, cfg)
  assert count == ref_count
  np.testing.assert_array_equal(classes, ref_classes)
  assert abs(pixels - ref_pixels) <= 1e-5 * ref_pixels


def test_image_folder_feeds_the_pipeline(tmp_path):
  root = tmp_path / 'pets'
  rng = np.random.RandomState(0)
  for split, n in (('train', 3), ('validation', 2)):
    for cls in ('cat', 'dog'):
      folder = root / split / cls
      folder.mkdir(parents=True)
      for i in range(n):
        size = (40 + 5 * i, 50, 3)
        png = tf.io.encode_png(rng.randint(0, 255, size).astype(np.uint8))
        (folder / f'{i}.png').write_bytes(png.numpy())
  source = data_lib.get_source(f'folder:{root}')
  assert source.class_names == ['cat', 'dog']
  cfg = Config(train_mode='finetune', image_size=32, eval_split='validation',
               train_split='train')
  images, labels = first_batch(data_lib.build_input_fn(source, 4, True,
                                                       cfg)())
  assert images.shape == [4, 32, 32, 3]
  batches = list(data_lib.build_input_fn(source, 3, False, cfg)())
  # 4 images, padded to 2 batches of 3.
  count, classes, _ = _eval_totals(batches, num_classes=2)
  assert count == 4 and len(batches) == 2
  assert list(classes) == [2, 2]


def _ids(source, split, input_context=None):
  return [x['id'].numpy().decode() for x in
          source.as_dataset(split, input_context=input_context)]


def test_tfds_split_slices_read_and_count_their_examples(shapes):
  train = _ids(shapes, 'train')
  assert sorted(train) == [f'train_{i:05d}' for i in range(5000)]
  first, rest = _ids(shapes, 'train[:10%]'), _ids(shapes, 'train[10%:]')
  # A partition of the split, the same examples at every read.
  assert (len(first), len(rest)) == (500, 4500)
  assert sorted(first + rest) == sorted(train)
  assert _ids(shapes, 'train[:10%]') == first
  assert [shapes.num_examples(s) for s in (
      'train[:10%]', 'train[10%:]', 'train[:1000]+test')] == [500, 4500, 2000]
  # Two input pipelines (workers) read disjoint halves of the slice.
  halves = [_ids(shapes, 'train[:10%]', tf.distribute.InputContext(2, w, 1))
            for w in (0, 1)]
  assert sorted(halves[0] + halves[1]) == sorted(first)
  assert len(halves[0]) == len(halves[1]) == 250


@pytest.mark.parametrize('split', ['train[:200%]', 'train[', 'nope[:5]',
                                   'train[:0]'])
def test_bad_split_slices_give_one_line(shapes, split):
  with pytest.raises(data_lib.DatasetError) as error:
    shapes.num_examples(split)
  message = str(error.value)
  assert message.startswith(f'split {split!r} ') and '\n' not in message
  assert ('has no examples' if split == 'train[:0]' else
          'it has train, test (slices such as train[:10%] work too)'
          ) in message


def test_the_schedule_counts_the_slice(shapes10_dir, tmp_path):
  """One epoch of 'train[:2%]' (100 examples) at batch 50: the original's
  step count, examples * epochs // batch + 1, is 3 (the whole split: 101)."""
  import training  # pylint: disable=import-outside-toplevel
  cfg = Config(dataset='shapes10', data_dir=str(shapes10_dir),
               train_split='train[:2%]', train_epochs=1, train_batch_size=50,
               resnet_depth=18, width_multiplier=0.25, image_size=32,
               use_blur=False, use_tpu=False, mode='train',
               model_dir=str(tmp_path)).validate()
  training.run(cfg)
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-3')
