"""Shapes10, the embedded offline dataset: shape, metadata, determinism, learnability."""
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

import embedded_dataset

SIZES = {'train': 5000, 'test': 1000}


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  start = time.perf_counter()
  b = embedded_dataset.load_builder(str(data_dir))
  # Printed, not asserted: speed is measured by benchmarks, not timed tests.
  print(f'\nshapes10 prepared in {time.perf_counter() - start:.1f} s')
  return b


@pytest.fixture(scope='module')
def data(builder):
  """{split: (images uint8 [N,32,32,3], labels int64 [N], ids [N])}."""
  out = {}
  for split in SIZES:
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    out[split] = (ex['image'], ex['label'], ex['id'].astype(str))
  return out


def test_registered_under_its_name():
  assert embedded_dataset.NAME == 'shapes10'
  assert 'shapes10' in tfds.list_builders()
  assert embedded_dataset.Shapes10.name == 'shapes10'
  assert str(embedded_dataset.Shapes10.VERSION) == '2.0.0'


def test_info(builder):
  info = builder.info
  assert {s: info.splits[s].num_examples for s in SIZES} == SIZES
  assert set(info.splits.keys()) == set(SIZES)
  label = info.features['label']
  assert label.num_classes == 10
  assert tuple(label.names) == embedded_dataset.CLASS_NAMES
  assert len(set(label.names)) == 10
  image = info.features['image']
  assert image.shape == (32, 32, 3) and image.np_dtype == np.uint8
  assert image.encoding_format == 'png'
  assert info.supervised_keys == ('image', 'label')
  assert 'procedurally' in info.description
  # No homepage is stored (the `homepage` property falls back to a TFDS
  # catalogue address that does not exist for this dataset).
  assert not info.as_proto.location.urls
  assert not info.citation


def test_examples_read_match_info(builder, data):
  for split, n in SIZES.items():
    images, labels, ids = data[split]
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (n,)
    assert len(set(ids)) == n
    assert builder.info.splits[split].num_examples == n
  image, label = next(iter(tfds.as_numpy(
      builder.as_dataset(split='test', as_supervised=True))))
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  assert 0 <= label < 10


def test_every_class_present_and_balanced(data):
  for split, n in SIZES.items():
    counts = np.bincount(data[split][1], minlength=10)
    assert len(counts) == 10
    assert counts.min() >= 0.08 * n and counts.max() <= 0.12 * n, counts


def test_images_are_not_degenerate(data):
  images = data['train'][0].astype(np.float32)
  # Every image has a visible pattern (foreground/background contrast).
  assert (images.reshape(len(images), -1).std(axis=1) > 10).all()
  # Colours cover the range: no class-specific palette.
  assert images.min() == 0 and images.max() == 255


def test_prepared_data_equals_regenerated(data):
  """The stored PNGs decode to exactly what the drawing function gives."""
  for split in SIZES:
    images, labels, ids = data[split]
    index = np.array([int(i.rsplit('_', 1)[1]) for i in ids])
    assert sorted(index) == list(range(SIZES[split]))
    assert all(i.startswith(split + '_') for i in ids)
    redrawn, relabels = embedded_dataset.draw_examples(split, index)
    np.testing.assert_array_equal(labels, relabels)
    np.testing.assert_array_equal(images, redrawn)


def test_draw_is_deterministic_per_example():
  first, labels = embedded_dataset.draw_examples('train', np.arange(50))
  again, _ = embedded_dataset.draw_examples('train', np.arange(50))
  assert first.tobytes() == again.tobytes()
  # Example i does not depend on which other examples are drawn with it.
  alone, _ = embedded_dataset.draw_examples('train', [49, 7])
  np.testing.assert_array_equal(alone, first[[49, 7]])
  np.testing.assert_array_equal(labels, np.arange(50) % 10)
  # The splits differ.
  test, _ = embedded_dataset.draw_examples('test', np.arange(50))
  assert not np.array_equal(test, first)


def test_bad_split_is_refused():
  with pytest.raises(ValueError, match="'validation'"):
    embedded_dataset.draw_examples('validation', [0])


def test_load_builder_reuses_prepared_data(builder):
  again = embedded_dataset.load_builder(builder.data_dir.rsplit('/shapes10', 1)[0])
  assert again.data_dir == builder.data_dir
  assert again.info.splits['train'].num_examples == 5000


def _spectrum_features(images):
  """Log power spectrum of the contrast-normalised grayscale image.

  Translation-invariant and blind to which colour is foreground, so it sees
  the geometry only.
  """
  gray = images.astype(np.float32).mean(-1)
  gray -= gray.mean(axis=(1, 2), keepdims=True)
  gray /= gray.std(axis=(1, 2), keepdims=True) + 1e-6
  return np.log1p(np.abs(np.fft.rfft2(gray))).reshape(len(images), -1)


def _colour_histogram(images):
  q = images.astype(np.int64) // 64  # 4 levels per channel, 64 bins
  idx = (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).reshape(len(images), -1)
  return np.stack([np.bincount(i, minlength=64) for i in idx]) / idx.shape[1]


def _nearest_class_mean(ftr, ytr, fte, yte):
  mu = np.stack([ftr[ytr == c].mean(0) for c in range(10)])
  d = (fte ** 2).sum(1)[:, None] - 2 * fte @ mu.T + (mu ** 2).sum(1)[None]
  return float((d.argmin(1) == yte).mean())


def _logistic_regression(ftr, ytr, fte, yte, steps=150, lr=0.5):
  mean, std = ftr.mean(0), ftr.std(0) + 1e-6
  ftr, fte = (ftr - mean) / std, (fte - mean) / std
  w, b = np.zeros((ftr.shape[1], 10)), np.zeros(10)
  onehot = np.eye(10)[ytr]
  for _ in range(steps):
    z = ftr @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - onehot) / len(ftr)
    w -= lr * ftr.T @ g
    b -= lr * g.sum(0)
  return float(((fte @ w + b).argmax(1) == yte).mean())


def test_classes_are_learnable_and_not_by_colour(data):
  (xtr, ytr, _), (xte, yte, _) = data['train'], data['test']
  ftr, fte = _spectrum_features(xtr), _spectrum_features(xte)
  ncm = _nearest_class_mean(ftr, ytr, fte, yte)
  logreg = _logistic_regression(ftr, ytr, fte, yte)
  htr, hte = _colour_histogram(xtr), _colour_histogram(xte)
  colour_ncm = _nearest_class_mean(htr, ytr, hte, yte)
  colour_logreg = _logistic_regression(htr, ytr, hte, yte)
  print(f'\ntest accuracy, spectrum features: nearest class mean {ncm:.3f}, '
        f'logistic regression {logreg:.3f}; colour histogram: nearest class '
        f'mean {colour_ncm:.3f}, logistic regression {colour_logreg:.3f}')
  assert ncm >= 0.3
  assert logreg >= 0.5
  # Colour alone is close to chance (0.1): the geometry carries the class.
  assert colour_ncm < 0.25 and colour_logreg < 0.25
