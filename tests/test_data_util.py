"""Augmentations and eval preprocessing of data_util against the values the
original computed (numerics.npz of ../shared/fixtures and fixtures_det), plus
invariants of the seeded random augmentations."""
import numpy as np
import pytest
import tensorflow as tf

from helpers import assert_close
import data_util


def _image(seed, height=40, width=48):
  """A smooth random float image in [0, 1] of shape [height, width, 3]."""
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[0:height, 0:width] / 7.0
  base = np.stack([np.sin(yy + c) * np.cos(xx - c) for c in range(3)], -1)
  noisy = 0.5 + 0.4 * base + 0.1 * rng.rand(height, width, 3)
  return tf.constant(np.clip(noisy, 0, 1), tf.float32)


# ------------------------------------------------- original's values: fixtures

@pytest.mark.parametrize('key,source,size,test_crop', [
    ('eval32_nocrop', 'img32_u8', 32, False),
    ('eval32_crop_from40x48', 'img40x48_u8', 32, True),
    ('eval224_crop_from256x320', 'img256x320_u8', 224, True)])
def test_eval_preprocessing(ref, key, source, size, test_crop):
  out = data_util.preprocess_image(ref[f'data/{source}'], size, size,
                                   is_training=False, test_crop=test_crop)
  assert out.dtype == tf.float32
  assert_close(out, ref[f'data/{key}'])


def test_crop_geometry(ref):
  rows = []
  for h, w, out_h, out_w in ref['data/crop_geometry_in']:
    window = data_util.center_crop_window(int(h), int(w), int(out_h),
                                          int(out_w), data_util.CROP_PROPORTION)
    rows.append([int(v) for v in window])
  np.testing.assert_array_equal(np.array(rows, np.int64),
                                ref['data/crop_geometry_out'])


@pytest.mark.parametrize('keep,key', [(True, 'gray32_keep'),
                                      (False, 'gray32_nokeep')])
def test_grayscale(ref, keep, key):
  # convert_image_dtype (x * (1/255)) is what the original fed in; plain
  # x / 255 differs by one float32 ulp in places.
  image = tf.image.convert_image_dtype(ref['data/img32_u8'], tf.float32)
  assert_close(data_util.to_grayscale(image, keep_channels=keep),
               ref[f'data/{key}'])


#---------------------------------------------- original's values: fixtures_det

@pytest.mark.parametrize('name,size', [
    ('img50x70', 32), ('img50x70', 224), ('img300x400', 32),
    ('img300x400', 224), ('img32x32', 32)])
def test_det_eval_crop(det, name, size):
  key = f'pre/{name}_s{size}_crop'
  out = data_util.preprocess_image(det[f'pre/{name}'], size, size,
                                   is_training=False, test_crop=True)
  assert_close(out, det[key])


def test_det_eval_nocrop(det):
  out = data_util.preprocess_image(det['pre/img32x32'], 32, 32,
                                   is_training=False, test_crop=False)
  assert_close(out, det['pre/img32x32_s32_nocrop'])


@pytest.mark.parametrize('height,width', [(32, 64), (64, 32)])
def test_det_eval_non_square(det, height, width):
  image = tf.image.convert_image_dtype(det['pre/img300x400'], tf.float32)
  out = data_util.preprocess_for_eval(image, height, width, crop=True)
  assert_close(out, det[f'pre/img300x400_h{height}_w{width}_crop'])


@pytest.mark.parametrize('name', ['img50x70', 'img300x400'])
def test_nocrop_on_wrong_size_is_a_clear_error(det, name):
  # The original fails inside tf.reshape; we name the shapes instead.
  with pytest.raises(ValueError, match=r'\[32, 32, 3\].*got shape'):
    data_util.preprocess_image(det[f'pre/{name}'], 32, 32, is_training=False,
                               test_crop=False)


def test_nocrop_on_wrong_size_in_graph_mode():
  fn = tf.function(lambda x: data_util.preprocess_for_eval(x, 32, 32, False),
                   input_signature=[tf.TensorSpec([None, None, 3])])
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'\[32, 32, 3\]'):
    fn(tf.zeros([40, 48, 3]))


def test_det_grayscale(det):
  assert_close(data_util.to_grayscale(det['blur/img32']),
               det['gray/img32_keep'])
  assert_close(data_util.to_grayscale(det['blur/img32'], keep_channels=False),
               det['gray/img32_nokeep'])


#----------------------------------------------------- seeded random invariants

@pytest.mark.parametrize('height,width', [(32, 32), (24, 40)])
def test_train_view_shape_range_and_seeds(height, width):
  image = _image(0)
  views = [data_util.preprocess_for_train(image, height, width,
                                          color_jitter_strength=1.0, seed=s)
           for s in (1, 2, 1)]
  for view in views:
    assert view.shape == (height, width, 3)
    assert view.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(view)) <= float(tf.reduce_max(view)) <= 1
  np.testing.assert_array_equal(views[0], views[2])  # same seed, same view
  assert np.abs(views[0].numpy() - views[1].numpy()).max() > 1e-3


def test_crop_and_flip_differ_between_seeds():
  image = _image(1)
  a, b = (data_util.preprocess_for_train(image, 32, 32, seed=s) for s in (3, 4))
  assert np.abs(a.numpy() - b.numpy()).max() > 1e-3


def test_crop_and_resize_shapes_and_window():
  image = _image(2, 60, 80)
  for seed in range(5):
    out = data_util.crop_and_resize(image, 24, 32, seed=seed)
    assert out.shape == (24, 32, 3)
    crop = data_util.distorted_bounding_box_crop(
        image, tf.constant([[[0., 0., 1., 1.]]]), area_range=(0.08, 1.0),
        aspect_ratio_range=(0.75, 4. / 3.), seed=[seed, 7])
    h, w = crop.shape[:2]
    assert 1 <= h <= 60 and 1 <= w <= 80
    # Small tolerance: the sampler rounds to whole pixels.
    assert 0.07 <= h * w / (60 * 80) <= 1.0
    assert 0.7 <= w / h <= 1.4


def test_unseeded_ops_still_run():
  image = _image(3)
  assert data_util.preprocess_image(
      tf.cast(image * 255, tf.uint8), 32, 32, is_training=True,
      color_jitter_strength=0.5).shape == (32, 32, 3)
  assert data_util.color_jitter(image, 1.0).shape == image.shape


def test_flip_is_a_mirror_or_identity():
  image = _image(4)
  seen = set()
  for seed in range(8):
    out = data_util.random_flip_left_right(image, seed=seed).numpy()
    if np.array_equal(out, image.numpy()):
      seen.add('same')
    else:
      np.testing.assert_array_equal(out, image.numpy()[:, ::-1])
      seen.add('flip')
  assert seen == {'same', 'flip'}


def test_grayscale_has_equal_channels():
  gray = data_util.to_grayscale(_image(5)).numpy()
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize('random_order', [True, False])
def test_color_jitter_strength_zero_is_identity(random_order):
  image = _image(6)
  out = data_util.color_jitter(image, 0.0, random_order=random_order, seed=5)
  np.testing.assert_allclose(out, image, rtol=0, atol=1e-6)


@pytest.mark.parametrize('random_order', [True, False])
def test_color_jitter_range_and_change(random_order):
  image = _image(7)
  out = data_util.color_jitter(image, 1.0, random_order=random_order, seed=9)
  assert out.shape == image.shape
  assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 1
  assert np.abs(out.numpy() - image.numpy()).max() > 1e-3


def test_color_jitter_in_graph_mode():
  fn = tf.function(lambda x: data_util.color_jitter(x, 1.0, seed=[1, 2]))
  image = _image(8)
  np.testing.assert_allclose(fn(image),
                             data_util.color_jitter(image, 1.0, seed=[1, 2]),
                             rtol=0, atol=1e-6)


def test_random_brightness_factor_range():
  image = tf.fill([4, 4, 3], 0.5)
  for seed in range(6):
    out = data_util.random_brightness(image, 0.8, seed=seed).numpy()
    factor = out[0, 0, 0] / 0.5
    assert 0.2 - 1e-6 <= factor <= 1.8 + 1e-6
    np.testing.assert_allclose(out, 0.5 * factor, rtol=1e-6)
  with pytest.raises(ValueError, match='impl'):
    data_util.random_brightness(image, 0.8, impl='nope')


def test_random_apply_p0_and_p1():
  image = _image(9)
  for seed in range(4):
    untouched = data_util.random_apply(lambda x: 1 - x, 0.0, image, seed=seed)
    np.testing.assert_array_equal(untouched, image)
    applied = data_util.random_apply(lambda x: 1 - x, 1.0, image, seed=seed)
    np.testing.assert_array_equal(applied, 1 - image)
  np.testing.assert_array_equal(
      data_util.random_color_jitter(image, p=0.0, seed=1), image)


def test_random_color_jitter_gray_or_color():
  image = _image(10)
  gray = 0
  for seed in range(30):
    out = data_util.random_color_jitter(image, strength=1.0, seed=seed).numpy()
    assert out.shape == image.shape
    assert out.min() >= 0 and out.max() <= 1
    gray += int(np.array_equal(out[..., 0], out[..., 1]) and
                np.array_equal(out[..., 0], out[..., 2]))
  # Grayscale has probability 0.2: some of the 30 draws, but not most.
  assert 1 <= gray <= 15


def test_batch_random_blur_rate_and_sigma_distribution():
  """Blur of unit impulses: the response's spatial variance is sigma^2, so
  each batch's sigma can be read back. Kernel from height=224 (22 taps,
  radius 11: sigma <= 2 is not truncated) on 48x48 impulses to stay cheap."""
  impulse = np.zeros([8, 48, 48, 1], np.float32)
  impulse[:, 24, 24] = 1
  taps = np.arange(48) - 24
  batches, sigmas, blurred = 300, [], 0
  for seed in range(batches):
    out, = data_util.batch_random_blur([tf.constant(impulse)], 224, 224,
                                       seed=seed)
    out = out.numpy()[..., 0]
    changed = [not np.array_equal(o, impulse[0, ..., 0]) for o in out]
    blurred += sum(changed)
    if any(changed):
      rows = out[changed]
      profile = rows.sum(1)  # [n, W]: mass along x
      variance = (profile * taps**2).sum(-1) / profile.sum(-1)
      # One sigma per batch: every blurred image of it is the same.
      np.testing.assert_allclose(variance, variance[0], rtol=1e-4)
      sigmas.append(np.sqrt(variance[0]))
  # p = 0.5 per image, 2400 images: 4 standard deviations is 0.041.
  assert abs(blurred / (8 * batches) - 0.5) < 0.041
  sigmas = np.array(sigmas)
  # U(0.1, 2.0); below ~0.25 the sampled kernel is all but a delta, so the
  # low end reads back at or under 0.1 and never above 2.0.
  assert sigmas.max() <= 2.0 + 1e-3 and sigmas.max() > 1.9
  assert sigmas.min() < 0.35
  n = len(sigmas)
  for threshold, expected in ((1.05, 0.5), (0.6, 1 - 0.5 / 1.9),
                              (1.6, 0.4 / 1.9)):
    share = np.mean(sigmas > threshold)
    assert abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / n)


def test_uint8_training_view_equals_converting_first():
  """preprocess_image crops uint8 images before converting them (less to
  convert): the same view as converting the whole image first."""
  image = tf.cast(_image(11, 50, 70) * 255, tf.uint8)
  for seed in range(6):
    got = data_util.preprocess_image(image, 32, 32, is_training=True,
                                     color_jitter_strength=0.5, seed=seed)
    want = data_util.preprocess_for_train(
        tf.image.convert_image_dtype(image, tf.float32), 32, 32,
        color_jitter_strength=0.5, seed=seed)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
