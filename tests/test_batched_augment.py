"""The batched (vectorised) SimCLR augmentation in data_util: replayed
example by example with the per-example ops (tf.image.resize, adjust_*), and
statistical checks of its random draws."""
import numpy as np
import pytest
import tensorflow as tf

import data_util


def _images(n=64, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.integers(0, 256, [n, size, size, 3], np.uint8))


def test_crop_windows_match_per_example_distribution():
  n = 2000
  windows = data_util.batch_sample_crop_windows(
      n, 32, 32, aspect_ratio_range=(0.75, 4. / 3.), seed=1).numpy()
  oy, ox, h, w = windows.T
  assert (h >= 1).all() and (w >= 1).all()
  assert (oy + h <= 32).all() and (ox + w <= 32).all()
  area = h * w / 1024.
  assert area.min() >= 0.08 and area.max() <= 1.0
  # The per-example op, same image size and ranges, many seeds.
  ref = []
  for i in range(600):
    _, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [32, 32, 3], tf.constant([[[0., 0., 1., 1.]]]), seed=[i, 7],
        min_object_covered=0.1, aspect_ratio_range=(0.75, 4. / 3.),
        area_range=(0.08, 1.0), max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    ref.append(size.numpy()[:2])
  ref = np.array(ref, np.float64)
  ref_area = ref[:, 0] * ref[:, 1] / 1024.
  ref_aspect = ref[:, 1] / ref[:, 0]
  aspect = w / h
  assert abs(area.mean() - ref_area.mean()) < 0.03
  assert abs(np.median(area) - np.median(ref_area)) < 0.05
  assert abs(aspect.mean() - ref_aspect.mean()) < 0.03
  assert abs((area == 1).mean() - (ref_area == 1).mean()) < 0.03
  # The quantiles of the two area distributions agree.
  qs = [0.1, 0.25, 0.5, 0.75, 0.9]
  np.testing.assert_allclose(np.quantile(area, qs), np.quantile(ref_area, qs),
                             atol=0.06)


def test_shapes_dtypes_range_and_seed():
  x = _images(32, 48)
  out = data_util.batch_preprocess_for_train(x, 32, 32, 1.0, seed=3)
  assert out.shape == (32, 32, 32, 3) and out.dtype == tf.float32
  assert float(tf.reduce_min(out)) >= 0. and float(tf.reduce_max(out)) <= 1.
  again = data_util.batch_preprocess_for_train(x, 32, 32, 1.0, seed=3)
  np.testing.assert_array_equal(out.numpy(), again.numpy())
  other = data_util.batch_preprocess_for_train(x, 32, 32, 1.0, seed=4)
  assert not np.allclose(out.numpy(), other.numpy())
  floats = data_util.batch_preprocess_for_train(
      tf.cast(x, tf.float32) / 255., 32, 32, 1.0, seed=3)
  np.testing.assert_allclose(floats.numpy(), out.numpy(), atol=2e-5)
  # Non-square output.
  rect = data_util.batch_preprocess_for_train(x, 24, 40, 0.5, seed=1)
  assert rect.shape == (32, 24, 40, 3)
  # Stateful (unseeded) path works and is in range too.
  free = data_util.batch_preprocess_for_train(x, 32, 32, 0.5)
  assert float(tf.reduce_min(free)) >= 0. and float(tf.reduce_max(free)) <= 1.


def test_two_views():
  x = _images(16)
  views = data_util.batch_preprocess_two_views(x, 32, 32, 0.5, seed=5)
  assert views.shape == (16, 32, 32, 6)
  a, b = views[..., :3].numpy(), views[..., 3:].numpy()
  differs = [not np.allclose(a[i], b[i]) for i in range(16)]
  assert all(differs)


def test_no_crop_no_flip_no_color_is_identity():
  x = _images(8)
  out = data_util.batch_preprocess_for_train(x, 32, 32, 0., crop=False,
                                             flip=False, seed=0)
  np.testing.assert_allclose(out.numpy(), x.numpy() / 255., atol=1e-6)
  with pytest.raises(ValueError):
    data_util.batch_preprocess_for_train(_images(2, 40), 32, 32, crop=False)


def test_flip_rate():
  x = _images(1000, 8)
  out = data_util.batch_preprocess_for_train(x, 8, 8, 0., crop=False,
                                             seed=11).numpy()
  ref = x.numpy() / 255.
  flipped = np.all(np.isclose(out, ref[:, :, ::-1]), axis=(1, 2, 3))
  same = np.all(np.isclose(out, ref), axis=(1, 2, 3))
  assert (flipped ^ same).all()
  assert abs(flipped.mean() - 0.5) < 0.05


def test_flip_folded_into_crop_mirrors():
  """Same seed, flip on/off: the crop is the same, mirrored or not."""
  x = _images(200)
  plain = data_util.batch_crop_and_resize(x, 32, 32, seed=2).numpy()
  flips = tf.constant(np.arange(200) % 2 == 0)
  mixed = data_util.batch_crop_and_resize(x, 32, 32, flip=flips,
                                          seed=2).numpy()
  np.testing.assert_allclose(mixed[1::2], plain[1::2], rtol=0, atol=1e-3)
  np.testing.assert_allclose(mixed[0::2], plain[0::2, :, ::-1], rtol=0,
                             atol=1e-3)


def test_strength_zero_is_crop_and_flip_only():
  x = _images(64)
  out = data_util.batch_preprocess_for_train(x, 32, 32, 0., seed=9)
  draws = data_util.batch_train_draws(64, 32, 32, 32, 32, 0., seed=9)
  assert set(draws) == {'windows', 'flip'}
  expected = data_util.batch_crop_and_resize(
      x, 32, 32, flip=draws['flip'], windows=draws['windows']) / 255.
  np.testing.assert_allclose(out.numpy(), np.clip(expected.numpy(), 0, 1),
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize('source,out', [((60, 80), (24, 32)),
                                        ((20, 20), (32, 32)),
                                        ((33, 47), (32, 32))])
def test_resize_matrices_are_tf_bicubic_resize(source, out):
  """Down- and upsampling, odd sizes, whole and 1-pixel windows: each
  example's crop equals tf.image.resize(window, 'bicubic'), mirrored when
  flipped (the matrices use the kernel's table and border weights)."""
  rng = np.random.default_rng(5)
  n = 40
  image = rng.uniform(0, 1, [n, *source, 3]).astype(np.float32)
  windows = data_util.batch_sample_crop_windows(n, *source, seed=6).numpy()
  windows[0] = [0, 0, *source]  # whole image
  windows[1] = [3, 5, 1, 1]  # a single pixel
  windows[2] = [0, 0, source[0], 1]  # one column
  flips = rng.uniform(size=n) < 0.5
  for jit in (True, False):
    got = data_util.batch_crop_and_resize(
        tf.constant(image), *out, flip=tf.constant(flips),
        windows=tf.constant(windows), jit_compile=jit).numpy()
    for i, (oy, ox, h, w) in enumerate(windows):
      want = tf.image.resize(image[i:i + 1, oy:oy + h, ox:ox + w], out,
                             method='bicubic')[0].numpy()
      if flips[i]:
        want = want[:, ::-1]
      np.testing.assert_allclose(got[i], want, rtol=0, atol=2e-6)


def _replay_per_example(images, draws, height, width, strength):
  """preprocess_for_train's operations, one example at a time, with the
  batch's draws: crop + bicubic resize, flip, jitter in the drawn order with
  a clip after each step, grayscale, clip."""
  out = []
  for i in range(images.shape[0]):
    x = tf.image.convert_image_dtype(images[i], tf.float32)
    if 'windows' in draws:
      oy, ox, h, w = draws['windows'][i].numpy()
      x = tf.image.resize(x[None, oy:oy + h, ox:ox + w], [height, width],
                          method='bicubic')[0]
    if 'flip' in draws and bool(draws['flip'][i]):
      x = x[:, ::-1]
    if strength and bool(draws['jitter'][i]):
      for position, which in enumerate(draws['order'][i].numpy()):
        if which == 0:
          x = (x * draws['scale'][position, i] +
               draws['offset'][position, i])
        elif which == 1:
          x = tf.image.adjust_contrast(x, draws['contrast'][position, i])
        elif which == 2:
          x = tf.image.adjust_saturation(x, draws['saturation'][position, i])
        else:
          x = tf.image.adjust_hue(x, draws['hue'][position, i])
        x = tf.clip_by_value(x, 0., 1.)
    if strength and bool(draws['gray'][i]):
      x = data_util.to_grayscale(x)
    out.append(tf.clip_by_value(x, 0., 1.).numpy())
  return np.stack(out)


@pytest.mark.parametrize('source,out,strength,impl,jit', [
    ((32, 32), (32, 32), 0.5, 'simclrv2', True),
    ((40, 48), (24, 32), 1.0, 'simclrv2', True),
    ((64, 64), (32, 32), 1.5, 'simclrv2', False),
    ((32, 32), (32, 32), 1.0, 'simclrv1', True),
    ((32, 32), (32, 32), 0.0, 'simclrv2', True)])
def test_batched_view_is_the_per_example_ops(source, out, strength, impl,
                                             jit):
  """Noise images (bicubic overshoots [0, 1] a lot, so the first jitter step
  often sees out-of-range values, as in the original): every example equals
  the per-example operations with the same draws, up to float rounding."""
  n = 48
  x = _images(n, source[0]) if source[0] == source[1] else tf.constant(
      np.random.default_rng(1).integers(0, 256, [n, *source, 3], np.uint8))
  draws = data_util.batch_train_draws(n, *source, *out, strength, impl=impl,
                                      seed=3)
  got = data_util.batch_preprocess_for_train(
      x, *out, strength, impl=impl, jit_compile=jit, draws=draws).numpy()
  want = _replay_per_example(x, draws, *out, strength)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  if strength:
    # The draws cover what matters: jittered and plain, gray and color.
    for key in ('jitter', 'gray', 'flip'):
      assert 0 < draws[key].numpy().mean() < 1


def test_grayscale_and_jitter_rates():
  n = 2000
  x = _images(n, 8)
  out = data_util.batch_preprocess_for_train(x, 8, 8, 1.0, crop=False,
                                             flip=False, seed=21).numpy()
  gray = np.all(np.abs(out[..., 0] - out[..., 1]) < 1e-5, axis=(1, 2)) & (
      np.all(np.abs(out[..., 1] - out[..., 2]) < 1e-5, axis=(1, 2)))
  assert abs(gray.mean() - 0.2) < 0.03
  # Examples neither jittered nor grayed are unchanged: about 0.2 * 0.8.
  unchanged = np.all(np.abs(out - x.numpy() / 255.) < 1e-4, axis=(1, 2, 3))
  assert abs(unchanged.mean() - 0.2 * 0.8) < 0.03
  # Grayscale off: only the jitter coin (p=0.8) decides.
  out = data_util.batch_preprocess_for_train(
      x, 8, 8, 1.0, crop=False, flip=False, grayscale_probability=0.,
      seed=21).numpy()
  unchanged = np.all(np.abs(out - x.numpy() / 255.) < 1e-4, axis=(1, 2, 3))
  assert abs(unchanged.mean() - 0.2) < 0.03


@pytest.mark.parametrize('jit', [True, False])
def test_fixed_order_jitter_matches_per_example_ops(jit):
  """Fixed order, known factors: equals the tf.image.adjust_* sequence."""
  n = 12
  x = tf.cast(_images(n, 16), tf.float32) / 255.
  out = data_util.batch_color_jitter(x, 0.8, random_order=False,
                                     jit_compile=jit, seed=4).numpy()
  params = data_util.batch_color_params(n, 0.8, random_order=False, seed=4)
  for i in range(n):
    y = x[i]
    y = tf.clip_by_value(y * params['scale'][0, i], 0., 1.)
    y = tf.clip_by_value(tf.image.adjust_contrast(y, params['contrast'][1, i]),
                         0., 1.)
    y = tf.clip_by_value(
        tf.image.adjust_saturation(y, params['saturation'][2, i]), 0., 1.)
    y = tf.clip_by_value(tf.image.adjust_hue(y, params['hue'][3, i]), 0., 1.)
    np.testing.assert_allclose(out[i], y.numpy(), atol=2e-4)


@pytest.mark.parametrize('impl', ['simclrv2', 'simclrv1'])
def test_jitter_draws_cover_their_ranges(impl):
  """Strength 1.5 (amount 1.2): brightness factor in [max(1 - 1.2, 0), 2.2]
  (simclrv2) or offset in [-1.2, 1.2] (simclrv1), contrast and saturation
  in [-0.2, 2.2], hue shift in [-0.3, 0.3]; each filled out to its ends."""
  n = 4000
  params = data_util.batch_color_params(n, 1.5, impl=impl, seed=12)
  order = params['order'].numpy()
  taken = lambda which: order.T == which  # [4, n]: position p takes `which`
  bright = (params['scale'] if impl == 'simclrv2' else params['offset'])
  ranges = [(bright, (0., 2.2) if impl == 'simclrv2' else (-1.2, 1.2)),
            (params['contrast'], (-0.2, 2.2)),
            (params['saturation'], (-0.2, 2.2)),
            (params['hue'], (-0.3, 0.3))]
  for which, (values, (low, high)) in enumerate(ranges):
    drawn = values.numpy()[taken(which)]
    assert len(drawn) == n
    assert low - 1e-6 <= drawn.min() < low + 0.01
    assert high - 0.01 < drawn.max() <= high + 1e-6
    # Uniform: the mean sits in the middle (4 standard errors).
    assert abs(drawn.mean() - (low + high) / 2) < 4 * (high - low) / np.sqrt(
        12 * n)
    # Positions where the step is not taken hold its neutral value.
    neutral = 0. if which == 3 or (which == 0 and impl == 'simclrv1') else 1.
    np.testing.assert_array_equal(values.numpy()[~taken(which)], neutral)


def test_random_order_is_per_example_permutation():
  params = data_util.batch_color_params(500, 0.5, seed=8)
  order = params['order'].numpy()
  assert (np.sort(order, axis=1) == np.arange(4)).all()
  # Each step sits first about a quarter of the time.
  firsts = np.bincount(order[:, 0], minlength=4) / 500.
  assert np.abs(firsts - 0.25).max() < 0.07
  # Exactly one non-neutral step per example and position.
  active = ((params['scale'].numpy() != 1.) +
            (params['contrast'].numpy() != 1.) +
            (params['saturation'].numpy() != 1.) +
            (params['hue'].numpy() != 0.))
  assert (active.sum(axis=0) == 4).all()
