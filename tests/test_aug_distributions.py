"""The training augmentations follow the original's distributions.

../shared/fixtures_aug holds 4,000 views of two probe images drawn by the
original's data_util (crop and flip of a coordinate image; colour jitter and
grayscale of four colours) and summarised by `aug_stats`. Here the same probes
go through our per-example path (what ImageNet, image folders and every image
over 48 px use) and our batched path (small images), and each of the 29
statistics must pass a two-sample KS test against the original's at p > 1e-4.
The fixture README measured the smallest p of a right recipe at 0.04-0.12 and
of a halved jitter or a (0.5, 1) crop area at 6e-176 and 0. Seeded, so a
failure reproduces.
"""
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
import data_util

N = 4000        # views per statistic, as in the reference
OUT = 32        # output side of the crop probe, as in the reference
P_MIN = 1e-4    # the fixture README's threshold
STRENGTHS = (0.5, 1.0)
IMPLS = ('simclrv2', 'simclrv1')


@pytest.fixture(scope='module')
def aug_stats():
  folder = conftest.require(conftest.SHARED / 'fixtures_aug')
  if str(folder) not in sys.path:
    sys.path.insert(0, str(folder))
  import aug_stats as module  # pylint: disable=import-outside-toplevel
  return module


def _reference(aug_stats, src):
  path = conftest.SHARED / 'fixtures_aug' / f'original_{src}px.npz'
  return np.load(conftest.require(path))


def _coordinate_image(aug_stats, src):
  previous = aug_stats.SRC
  aug_stats.SRC = src   # coordinate_image reads the module's side
  try:
    return aug_stats.coordinate_image()
  finally:
    aug_stats.SRC = previous


def _per_example(fn, seed):
  """N outputs of `fn(seed)`, each with its own stateless seed."""
  ds = tf.data.Dataset.range(N).map(
      lambda i: fn(tf.stack([tf.constant(seed, tf.int64), i])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return np.stack(list(ds.batch(N).as_numpy_iterator())[0])


def _batched(fn, seed, chunk=1000):
  """N outputs of the batched `fn(count, seed)`, in chunks."""
  return np.concatenate([fn(chunk, [seed, i]).numpy()
                         for i in range(N // chunk)])


def _failures(aug_stats, ours, reference):
  """'stat: p' for every statistic of `ours` whose KS p-value is <= P_MIN."""
  bad = []
  for key, values in ours.items():
    _, p = aug_stats.ks_2samp(values, reference[key])
    if p <= P_MIN:
      bad.append(f'{key}: p={p:.2g}')
  return bad


def _crop_stats(aug_stats, views):
  return {f'crop/{k}': v for k, v in aug_stats.crop_stats(views).items()}


def _colour_stats(aug_stats, out, strength, impl):
  out = np.clip(out, 0., 1.)
  return {f'colour_s{strength}_{impl}/{k}': v
          for k, v in aug_stats.colour_stats(out).items()}


def test_reference_holds_every_statistic(aug_stats):
  """What the other tests compare: 5 crop and 24 colour statistics."""
  for src in (64, 32):
    reference = _reference(aug_stats, src)
    crop = _crop_stats(aug_stats, np.zeros([2, OUT, OUT, 3]))
    colour = {}
    for s in STRENGTHS:
      for impl in IMPLS:
        colour.update(_colour_stats(aug_stats, np.zeros([2, 2, 2, 3]), s, impl))
    assert set(reference.keys()) == set(crop) | set(colour)
    assert len(reference.keys()) == 29
    assert all(len(reference[k]) == N for k in reference.keys())


def test_per_example_crop_and_flip(aug_stats):
  image = tf.constant(_coordinate_image(aug_stats, 64))
  views = _per_example(
      lambda seed: data_util.preprocess_image(
          image, OUT, OUT, is_training=True, color_jitter_strength=0.,
          seed=seed), seed=11)
  ours = _crop_stats(aug_stats, views)
  assert _failures(aug_stats, ours, _reference(aug_stats, 64)) == []


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('strength', STRENGTHS)
def test_per_example_colour(aug_stats, strength, impl):
  colours = tf.constant(aug_stats.COLOURS)
  out = _per_example(
      lambda seed: data_util.random_color_jitter(
          colours, strength=strength, impl=impl, seed=seed), seed=12)
  ours = _colour_stats(aug_stats, out, strength, impl)
  assert _failures(aug_stats, ours, _reference(aug_stats, 64)) == []


def test_batched_crop_and_flip(aug_stats):
  image = tf.constant(_coordinate_image(aug_stats, 32))
  views = _batched(
      lambda count, seed: data_util.batch_preprocess_for_train(
          tf.repeat(image[None], count, 0), OUT, OUT,
          color_jitter_strength=0., seed=seed), seed=13)
  ours = _crop_stats(aug_stats, views)
  assert _failures(aug_stats, ours, _reference(aug_stats, 32)) == []


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('strength', STRENGTHS)
def test_batched_colour(aug_stats, strength, impl):
  colours = tf.constant(aug_stats.COLOURS)
  out = _batched(
      lambda count, seed: data_util.batch_preprocess_for_train(
          tf.repeat(colours[None], count, 0), 2, 2,
          color_jitter_strength=strength, crop=False, flip=False, impl=impl,
          seed=seed), seed=14)
  ours = _colour_stats(aug_stats, out, strength, impl)
  assert _failures(aug_stats, ours, _reference(aug_stats, 32)) == []


def test_the_statistics_see_a_wrong_recipe(aug_stats):
  """The KS test itself rejects a mild change: the flip probability 0.4."""
  reference = _reference(aug_stats, 64)
  rng = np.random.default_rng(0)
  flipped = (rng.uniform(size=N) < 0.4).astype(np.float64)
  assert _failures(aug_stats, {'crop/flipped': flipped}, reference)
