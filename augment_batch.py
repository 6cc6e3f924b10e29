"""The SimCLR training view of a whole batch at once (vectorised and
XLA-compiled; data.py uses it for small images of one size), and the
Gaussian blur, which the model applies to whole pretraining batches.

With the same random draws each example's view equals the per-example ops'
(augment_example.py) up to float rounding (tests/test_batched_augment.py);
both read augmentation_recipe.py. Every random function takes an optional
stateless `seed` (randomness.py).
"""
import numpy as np
import tensorflow as tf

import augmentation_recipe as recipe
import randomness


def gaussian_blur(image, kernel_size, sigma, padding='SAME'):
  """Separable Gaussian blur of one [H, W, C] image or a [B, H, W, C] batch.

  Args:
    image: float image(s).
    kernel_size: the filter has 2 * (kernel_size // 2) + 1 taps (an even size
      rounds up), as in the original.
    sigma: standard deviation in pixels (float or scalar tensor).
    padding: 'SAME' (zero padding, so borders darken, as in the original) or
      'VALID'.
  """
  image = tf.convert_to_tensor(image, tf.float32)
  radius = int(kernel_size / 2)
  taps = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  sigma = tf.cast(sigma, tf.float32)
  weights = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma)))
  weights /= tf.reduce_sum(weights)
  channels = tf.shape(image)[-1]
  size = 2 * radius + 1
  horizontal = tf.tile(tf.reshape(weights, [1, size, 1, 1]),
                       [1, 1, channels, 1])
  vertical = tf.tile(tf.reshape(weights, [size, 1, 1, 1]),
                     [1, 1, channels, 1])
  single = image.shape.ndims == 3
  batch = image[tf.newaxis] if single else image
  strides = [1, 1, 1, 1]
  batch = tf.nn.depthwise_conv2d(batch, horizontal, strides, padding)
  batch = tf.nn.depthwise_conv2d(batch, vertical, strides, padding)
  return batch[0] if single else batch


def batch_random_blur(images_list, height, width,
                      blur_probability=recipe.BLUR_PROBABILITY, seed=None):
  """Blurs each image of each batch in `images_list` with probability p.

  One sigma ~ U(recipe.BLUR_SIGMA_RANGE) per batch (the original's choice)
  and a kernel of height // recipe.BLUR_KERNEL_DIVISOR; each image
  independently keeps or takes the blurred version.
  Returns a list of [B, H, W, C] batches clipped to [0, 1].
  """
  del width
  rng = tf.random.Generator.from_seed(seed) if seed is not None else None
  uniform = rng.uniform if rng is not None else tf.random.uniform
  blurred_list = []
  for images in images_list:
    sigma = uniform([], *recipe.BLUR_SIGMA_RANGE, dtype=tf.float32)
    blurred = gaussian_blur(
        images, kernel_size=height // recipe.BLUR_KERNEL_DIVISOR, sigma=sigma)
    take = tf.cast(
        uniform([tf.shape(images)[0], 1, 1, 1], 0, 1, dtype=tf.float32)
        < blur_probability, images.dtype)
    mixed = blurred * take + images * (1 - take)
    blurred_list.append(tf.clip_by_value(mixed, 0., 1.))
  return blurred_list


# Vectorised counterparts of `augment_example.preprocess_for_train` for a
# whole batch at once
# (one op per step for all examples instead of one small op graph per example
# inside tf.data's per-example map). Every example still gets its own random
# parameters. Differences from the per-example functions above:
#
# * crop window: drawn by a vectorised re-implementation of the
#   sample_distorted_bounding_box algorithm (aspect ratio uniform, integer
#   height uniform between the smallest and largest allowed, the same
#   rounding, area and min_object_covered checks, offsets uniform in
#   [0, H - h - 1]; up to 100 attempts, fallback to the whole image), so the
#   distribution of windows is the op's; the random streams differ, so a seed
#   does not give the same window as the per-example code;
# * resize: bicubic with the weights of TF's ResizeBicubic kernel (Keys
#   cubic, a = -0.5, half-pixel centres, fractional offsets rounded to 1/1024,
#   taps outside the window dropped and the rest renormalised), written as one
#   [out, in] interpolation matrix per example and axis, so the crop of the
#   whole batch is two batched matmuls (the per-example path slices the window
#   and calls tf.image.resize); equal to it up to float rounding. The
#   matrices cost O(out * in) per axis, which is why data.py uses this path
#   for small images only;
# * flip: folded into the column matrix (its rows reversed) or, without a
#   crop, tf.where over the batch;
# * saturation and hue: per-example factors; each pixel is rebuilt from its
#   hue, its maximum and a minimum (saturation: from the scaled HSV
#   saturation, as AdjustSaturation; hue: the old one, as AdjustHue, which
#   keeps a pixel's minimum and maximum even outside [0, 1]), equal to the
#   kernels up to float rounding;
# * random order: a per-example permutation of the four jitter steps, as in
#   the original. It is realised by four positions over the whole batch; at
#   each one an affine step (brightness and contrast) and an HSV step
#   (saturation and hue) are computed for the batch and kept, each followed
#   by the original's clip, only for the examples whose step at that position
#   it is (tf.where). So every example undergoes exactly its own sequence,
#   and an example whose jitter is off stays unclipped until the grayscale
#   and the final clip, as in the original (bicubic crops overshoot [0, 1]);
# * the crop and the color arithmetic are XLA-compiled functions
#   (jit_compile=True by default): XLA may reorder / fuse float operations
#   (rounding-level differences);
# * grayscale replaces the examples that draw it by their luma image;
# * the jitter (p=0.8) and grayscale (p=0.2) coin flips are per example, as
#   in the original.


def _batch_uniform(shape, minval, maxval, seed=None):
  """`_uniform` for a (possibly dynamic) shape."""
  return randomness.uniform(shape, minval, maxval, seed)


def batch_sample_crop_windows(
    batch_size, image_height, image_width,
    aspect_ratio_range=recipe.CROP_ASPECT_RATIO_RANGE,
    area_range=recipe.CROP_AREA_RANGE,
    min_object_covered=recipe.CROP_MIN_OBJECT_COVERED,
    max_attempts=recipe.CROP_MAX_ATTEMPTS, seed=None):
  """Per-example crop windows drawn like sample_distorted_bounding_box.

  Mirrors the op's algorithm (tensorflow/core/kernels/image/
  sample_distorted_bounding_box_op.cc) with the whole image as the only
  bounding box, vectorised over [batch_size, max_attempts] draws; the first
  valid attempt of each example is kept and the whole image is used when none
  is valid.

  Args:
    batch_size: number of windows (int or scalar tensor).
    image_height, image_width: source image size (ints or scalar tensors).
    aspect_ratio_range: allowed window width / height.
    area_range: allowed window area as a fraction of the image.
    min_object_covered: minimum fraction of the image the window covers.
    max_attempts: draws per example.
    seed: optional stateless seed.

  Returns:
    int32 tensor [batch_size, 4]: offset_y, offset_x, crop_height,
    crop_width.
  """
  ar_seed, h_seed, y_seed, x_seed = randomness.split_seed(seed, 4)
  height_f = tf.cast(image_height, tf.float32)
  width_f = tf.cast(image_width, tf.float32)
  shape = tf.stack([tf.cast(batch_size, tf.int32), max_attempts])
  aspect = _batch_uniform(shape, aspect_ratio_range[0], aspect_ratio_range[1],
                          ar_seed)
  min_area = area_range[0] * width_f * height_f
  max_area = area_range[1] * width_f * height_f
  rint = tf.math.rint  # lrintf: round half to even
  low = rint(tf.sqrt(min_area / aspect))
  max_h = rint(tf.sqrt(max_area / aspect))
  # The largest height whose rounded width still fits.
  fit = tf.floor((width_f + 0.5 - 0.0000001) / aspect)
  fit = tf.where(rint(fit * aspect) > width_f, fit - 1, fit)
  max_h = tf.where(rint(max_h * aspect) > width_f, fit, max_h)
  max_h = tf.minimum(max_h, height_f)
  low = tf.minimum(low, max_h)
  u = _batch_uniform(shape, 0., 1., h_seed)
  h = tf.minimum(low + tf.floor(u * (max_h - low + 1)), max_h)
  w = rint(h * aspect)
  area = w * h
  h = tf.where(area < min_area, h + 1, h)
  w = rint(h * aspect)
  area = w * h
  h = tf.where(area > max_area, h - 1, h)
  w = rint(h * aspect)
  area = w * h
  valid = ((area >= min_area) & (area <= max_area) & (w <= width_f) &
           (h <= height_f) & (w > 0) & (h > 0) &
           (area / (width_f * height_f) >= min_object_covered))
  first = tf.argmax(tf.cast(valid, tf.int32), axis=1, output_type=tf.int32)
  found = tf.reduce_any(valid, axis=1)
  h = tf.where(found, tf.gather(h, first, batch_dims=1), height_f)
  w = tf.where(found, tf.gather(w, first, batch_dims=1), width_f)
  # random->Uniform(n) is an integer in [0, n - 1]; 0 when the side is full.
  uy = _batch_uniform(shape[:1], 0., 1., y_seed)
  ux = _batch_uniform(shape[:1], 0., 1., x_seed)
  oy = tf.minimum(tf.floor(uy * (height_f - h)), tf.maximum(height_f - h - 1, 0))
  ox = tf.minimum(tf.floor(ux * (width_f - w)), tf.maximum(width_f - w - 1, 0))
  return tf.cast(tf.stack([oy, ox, h, w], axis=1), tf.int32)


_CUBIC_TABLE_SIZE = 1024


def _cubic_table():
  a = -0.5
  x = np.arange(_CUBIC_TABLE_SIZE + 1, dtype=np.float64) / _CUBIC_TABLE_SIZE
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
  return np.stack([near, far], axis=1).astype(np.float32)


_CUBIC_TABLE = _cubic_table()


def bicubic_resize_matrix(out_size, window_size, window_offset, source_size,
                          reverse=None):
  """Per-example matrices that bicubically resample a window along one axis.

  Row i of example b holds the weights that tf.image.resize(..., 'bicubic')
  (antialias off: the ResizeBicubic kernel with half-pixel centres) gives the
  source pixels when resizing the window [offset, offset + size) of that axis
  to `out_size` pixels: Keys cubic weights from the kernel's 1/1024 table,
  taps outside the window dropped and the others renormalised to sum to 1.

  Args:
    out_size: Python int, output pixels along the axis.
    window_size, window_offset: float32 [B] (whole pixels), the window.
    source_size: int or scalar tensor, the source's pixels along the axis.
    reverse: optional bool [B]: mirror these examples' output (a flip).

  Returns:
    float32 [B, out_size, source_size].
  """
  size = window_size[:, None]
  scale = size / float(out_size)
  centre = (tf.range(out_size, dtype=tf.float32)[None] + 0.5) * scale - 0.5
  base = tf.floor(centre)
  step = tf.cast(tf.math.rint((centre - base) * _CUBIC_TABLE_SIZE), tf.int32)
  near, far = tf.unstack(tf.constant(_CUBIC_TABLE), axis=1)
  mirrored = _CUBIC_TABLE_SIZE - step
  weights = [tf.gather(far, step), tf.gather(near, step),
             tf.gather(near, mirrored), tf.gather(far, mirrored)]
  taps = (-1., 0., 1., 2.)
  weights = [tf.where((base + tap >= 0.) & (base + tap < size), weight, 0.)
             for tap, weight in zip(taps, weights)]
  total = weights[0] + weights[1] + weights[2] + weights[3]
  norm = tf.where(tf.abs(total) > 0., 1. / total, 1.)
  # Source pixel s gets the weight of tap s - (offset + base), if any.
  tap_of = (tf.range(source_size, dtype=tf.float32)[None, None] -
            window_offset[:, None, None] - base[..., None])
  matrix = tf.zeros_like(tap_of)
  for tap, weight in zip(taps, weights):
    matrix = tf.where(tf.equal(tap_of, tap), (weight * norm)[..., None],
                      matrix)
  if reverse is not None:
    matrix = tf.where(reverse[:, None, None], tf.reverse(matrix, axis=[1]),
                      matrix)
  return matrix


def _batch_crop_core(images, windows, flip, height, width):
  """Bicubic resize of per-example windows; flip: bool [B] (mirrored)."""
  shape = tf.shape(images)
  oy, ox, h, w = tf.unstack(tf.cast(windows, tf.float32), axis=1)
  rows = bicubic_resize_matrix(height, h, oy, shape[1])
  cols = bicubic_resize_matrix(width, w, ox, shape[2], reverse=flip)
  images = tf.cast(images, tf.float32)
  # Vertical pass, then horizontal, as the kernel interpolates.
  images = tf.einsum('bih,bhwc->biwc', rows, images)
  return tf.einsum('bjw,biwc->bijc', cols, images)


# About 3x faster than op by op on CPU for 32-px outputs.
_batch_crop_core_xla = tf.function(_batch_crop_core, jit_compile=True)


def batch_crop_and_resize(images, height, width, flip=None, seed=None,
                          windows=None, jit_compile=True):
  """Per-example random resized crop (bicubic) of a batch, optional flip.

  Args:
    images: [B, H, W, C] uint8 (values kept in 0..255) or float.
    height, width: output size (Python ints).
    flip: optional bool [B]: mirror these examples.
    seed: optional stateless seed for the windows.
    windows: optional int32 [B, 4] (offset_y, offset_x, height, width)
      windows to use instead of drawing them.
    jit_compile: compile the resampling with XLA.

  Returns:
    [B, height, width, C] float32 (same value scale as the input; bicubic
    can overshoot the input's range, as tf.image.resize does).
  """
  shape = tf.shape(images)
  if windows is None:
    aspect_ratio = width / height
    windows = batch_sample_crop_windows(
        shape[0], shape[1], shape[2],
        aspect_ratio_range=tuple(r * aspect_ratio
                                 for r in recipe.CROP_ASPECT_RATIO_RANGE),
        seed=seed)
  if flip is None:
    flip = tf.zeros([shape[0]], tf.bool)
  core = _batch_crop_core_xla if jit_compile else _batch_crop_core
  return core(images, windows, flip, height, width)


def _batch_color_core(images, input_scale, scale, offset, contrast,
                      saturation, hue, affine_on, saturation_on, hue_on,
                      gray):
  """The arithmetic of the batched color distortion, for XLA fusion.

  Four positions; at each one an affine step x * (scale * contrast) +
  (1 - contrast) * mean + offset (brightness and contrast) and then a
  saturation-or-hue step are computed for the whole batch, each followed by
  a clip to [0, 1], and kept only for the examples that take that step there
  (the masks); the parameters of steps not taken are neutral.

  Saturation and hue follow TF's kernels, including for the out-of-range
  values a bicubic crop leaves before the first clip: AdjustSaturation works
  in HSV (saturation 0 where the maximum is <= 0), AdjustHue keeps each
  pixel's minimum and maximum and moves the hue between them. Both are
  written as one rebuild from hue, maximum and a new minimum (the old one
  for a hue step).

  Args:
    images: [B, H, W, 3] float32 (any scale; multiplied by input_scale).
    input_scale: scalar, 1/255 for uint8-valued input, else 1.
    scale, offset, contrast, saturation, hue: float32 [4, B].
    affine_on, saturation_on, hue_on: bool [4, B].
    gray: bool [B], the examples that become grayscale.

  Returns:
    [B, H, W, 3] float32 in [0, 1].
  """
  # Channel planes [B, H, W] side by side: every per-pixel max, min and
  # blend below is a plain elementwise op (about 2x faster under XLA on CPU
  # than working across a last axis of 3).
  r, g, b = tf.unstack(tf.transpose(images, [3, 0, 1, 2]) * input_scale)
  per_example = lambda t: t[:, None, None]
  for position in range(4):
    k = per_example(contrast[position])
    factor = per_example(scale[position]) * k
    shift = per_example(offset[position])
    on = per_example(affine_on[position])
    r, g, b = [
        tf.where(on, tf.clip_by_value(
            plane * factor + (1. - k) * tf.reduce_mean(
                plane, axis=[1, 2], keepdims=True) + shift, 0., 1.), plane)
        for plane in (r, g, b)]
    high = tf.maximum(tf.maximum(r, g), b)
    low = tf.minimum(tf.minimum(r, g), b)
    span = high - low
    # Hue in sextants [0, 6), as RGBToHSV computes it (0 for grays).
    sextant = tf.where(r == high, (g - b) / span,
                       tf.where(g == high, (b - r) / span + 2.,
                                (r - g) / span + 4.))
    sextant = tf.where(span > 0., sextant, 0.)
    sextant += 6. * per_example(hue[position])
    sextant -= 6. * tf.floor(sextant * (1. / 6.))
    saturation_now = tf.where(high > 0., span / high, 0.)
    low = tf.where(
        per_example(saturation_on[position]),
        high * (1. - tf.clip_by_value(
            saturation_now * per_example(saturation[position]), 0., 1.)),
        low)
    on = per_example(saturation_on[position] | hue_on[position])
    # Each channel's share of (max - min) above the minimum, as HSVToRGB.
    shares = (tf.abs(sextant - 3.) - 1., 2. - tf.abs(sextant - 2.),
              2. - tf.abs(sextant - 4.))
    r, g, b = [
        tf.where(on, tf.clip_by_value(
            low + (high - low) * tf.clip_by_value(share, 0., 1.), 0., 1.),
                 plane)
        for plane, share in zip((r, g, b), shares)]
  # tf.image.rgb_to_grayscale's weights.
  luma = 0.2989 * r + 0.587 * g + 0.114 * b
  gray = per_example(gray)
  images = tf.stack([tf.where(gray, luma, plane) for plane in (r, g, b)],
                    axis=-1)
  return tf.clip_by_value(images, 0., 1.)


_batch_color_core_xla = tf.function(_batch_color_core, jit_compile=True)


def batch_color_params(batch, strength, apply=None, random_order=True,
                       impl='simclrv2', seed=None):
  """Per-example, per-position color jitter parameters (see core above).

  Args:
    batch: batch size (int or scalar tensor).
    strength: jitter strength s: brightness, contrast and saturation amounts
      0.8 s, hue shift up to 0.2 s (an amount of 0 leaves its step neutral).
    apply: optional bool [B]: examples that are jittered at all.
    random_order: per-example random permutation of the four steps, else
      brightness, contrast, saturation, hue.
    impl: 'simclrv2' (multiplicative brightness) or 'simclrv1' (additive).
    seed: optional stateless seed.

  Returns:
    dict of float32 [4, B] tensors scale, offset, contrast, saturation, hue
    (row p: the parameters used at position p), bool [4, B] affine_on,
    saturation_on and hue_on (the examples that take a brightness or
    contrast step, the saturation step, the hue step at position p) and int32
    [B, 4] order.
  """
  if impl not in ('simclrv2', 'simclrv1'):
    raise ValueError(f'Unknown impl {impl!r} for random brightness; '
                     "expected 'simclrv2' or 'simclrv1'.")
  amount = recipe.JITTER_AMOUNT * strength
  hue = recipe.HUE_AMOUNT * strength
  order_seed, b_seed, c_seed, s_seed, h_seed = randomness.split_seed(seed, 5)
  uniform = randomness.uniform
  if impl == 'simclrv2':
    brightness = uniform([batch], max(1.0 - amount, 0.0), 1.0 + amount,
                         b_seed)
  else:
    brightness = uniform([batch], -amount, amount, b_seed)
  draws = [brightness,
           uniform([batch], 1.0 - amount, 1.0 + amount, c_seed),
           uniform([batch], 1.0 - amount, 1.0 + amount, s_seed),
           uniform([batch], -hue, hue, h_seed)]
  neutral = [1. if impl == 'simclrv2' else 0., 1., 1., 0.]
  if random_order:
    order = tf.argsort(uniform(tf.stack([batch, 4]), 0., 1., order_seed),
                       axis=1)
  else:
    order = tf.tile(tf.range(4)[tf.newaxis], tf.stack([batch, 1]))
  if apply is None:
    apply = tf.ones([batch], tf.bool)
  rows = [[], [], [], []]
  for position in range(4):
    for which in range(4):
      on = apply & tf.equal(order[:, position], which)
      rows[which].append(tf.where(on, draws[which], neutral[which]))
  rows = [tf.stack(r) for r in rows]
  ones, zeros = tf.ones_like(rows[0]), tf.zeros_like(rows[0])
  # Strength 0 takes no step (the amounts are all 0 or none): the images
  # only get the final clip, which is what color_jitter's clips amount to.
  amounts = [amount, amount, amount, hue]
  taken = [[apply & tf.equal(order[:, position], which) & (amounts[which] != 0)
            for which in range(4)] for position in range(4)]
  return {'scale': rows[0] if impl == 'simclrv2' else ones,
          'offset': zeros if impl == 'simclrv2' else rows[0],
          'contrast': rows[1], 'saturation': rows[2], 'hue': rows[3],
          'affine_on': tf.stack([t[0] | t[1] for t in taken]),
          'saturation_on': tf.stack([t[2] for t in taken]),
          'hue_on': tf.stack([t[3] for t in taken]),
          'order': order}


def batch_color_jitter(images, strength, apply=None, random_order=True,
                       impl='simclrv2', jit_compile=True, seed=None):
  """`color_jitter` for a batch, with per-example factors and order.

  Args:
    images: float [B, H, W, 3] in [0, 1].
    strength: Python float, the jitter strength s.
    apply: optional bool [B]: only these examples are jittered (the others
      pass through, clipped).
    random_order: a random per-example order of the four steps, else
      brightness, contrast, saturation, hue.
    impl: 'simclrv2' (multiplicative brightness) or 'simclrv1' (additive).
    jit_compile: fuse the arithmetic with XLA (much faster on CPU).
    seed: optional stateless seed.

  Returns:
    [B, H, W, 3] float32 in [0, 1].
  """
  images = tf.convert_to_tensor(images, tf.float32)
  batch = tf.shape(images)[0]
  params = batch_color_params(batch, strength, apply=apply,
                              random_order=random_order, impl=impl, seed=seed)
  core = _batch_color_core_xla if jit_compile else _batch_color_core
  return core(images, tf.constant(1.), params['scale'], params['offset'],
              params['contrast'], params['saturation'], params['hue'],
              params['affine_on'], params['saturation_on'],
              params['hue_on'], tf.zeros([batch], tf.bool))


def batch_train_draws(batch, image_height, image_width, height, width,
                      color_jitter_strength=0., crop=True, flip=True,
                      impl='simclrv2',
                      jitter_probability=recipe.COLOR_JITTER_PROBABILITY,
                      grayscale_probability=recipe.GRAYSCALE_PROBABILITY,
                      seed=None):
  """The random choices of `batch_preprocess_for_train` for one batch.

  Args:
    batch: batch size (int or scalar tensor).
    image_height, image_width: size of the source images.
    height, width: output size.
    color_jitter_strength, crop, flip, impl, jitter_probability,
      grayscale_probability, seed: see `batch_preprocess_for_train`.

  Returns:
    dict: 'windows' int32 [B, 4] (offset_y, offset_x, height, width; absent
    without crop), 'flip' bool [B] (absent without flip), and with color
    'jitter' and 'gray' bool [B] plus the `batch_color_params` entries.
  """
  crop_seed, flip_seed, coin_seed, jitter_seed, gray_seed = (
      randomness.split_seed(seed, 5))
  uniform = randomness.uniform
  draws = {}
  if crop:
    aspect_ratio = width / height
    draws['windows'] = batch_sample_crop_windows(
        batch, image_height, image_width,
        aspect_ratio_range=tuple(r * aspect_ratio
                                 for r in recipe.CROP_ASPECT_RATIO_RANGE),
        seed=crop_seed)
  if flip:
    draws['flip'] = uniform([batch], 0., 1., flip_seed) < (
        recipe.FLIP_PROBABILITY)
  if color_jitter_strength:
    draws['jitter'] = uniform([batch], 0., 1., coin_seed) < jitter_probability
    draws['gray'] = uniform([batch], 0., 1., gray_seed) < (
        grayscale_probability)
    draws.update(batch_color_params(batch, color_jitter_strength,
                                    apply=draws['jitter'], impl=impl,
                                    seed=jitter_seed))
  return draws


def batch_preprocess_for_train(images, height, width, color_jitter_strength=0.,
                               crop=True, flip=True, impl='simclrv2',
                               jitter_probability=(
                                   recipe.COLOR_JITTER_PROBABILITY),
                               grayscale_probability=(
                                   recipe.GRAYSCALE_PROBABILITY),
                               jit_compile=True,
                               seed=None, draws=None):
  """One training view of every image of a batch, all ops vectorised.

  The batched counterpart of `preprocess_for_train` (see the notes at the top
  of this section for its differences): per-example random resized crop
  (bicubic), horizontal flip, color jitter (p=0.8 per example, per-example
  factors and order) and grayscale (p=0.2 per example), clipped to [0, 1].

  Args:
    images: [B, H, W, 3] uint8 (scaled by 1/255) or float in [0, 1], all the
      same size.
    height, width: output size.
    color_jitter_strength: jitter strength s; 0 turns the whole color
      distortion (grayscale included) off, as in the original.
    crop: random resized crop; if False the images must be [height, width].
    flip: random horizontal flip (p=1/2 per example).
    impl: brightness variant, 'simclrv2' or 'simclrv1'.
    jitter_probability, grayscale_probability: per-example probabilities of
      the two color steps (the original's 0.8 and 0.2).
    jit_compile: run the crop and the color arithmetic as XLA-compiled
      functions (several times faster on CPU than op by op); False runs the
      same ops uncompiled.
    seed: optional stateless seed (int or shape-[2] tensor).
    draws: optional `batch_train_draws` of the same settings to use instead
      of drawing (tests replay them example by example).

  Returns:
    [B, height, width, 3] float32 in [0, 1].
  """
  images = tf.convert_to_tensor(images)
  if images.dtype.is_integer and images.dtype != tf.uint8:
    raise ValueError(f'images must be uint8 or float, got {images.dtype}')
  shape = tf.shape(images)
  if draws is None:
    draws = batch_train_draws(
        shape[0], shape[1], shape[2], height, width,
        color_jitter_strength=color_jitter_strength, crop=crop, flip=flip,
        impl=impl, jitter_probability=jitter_probability,
        grayscale_probability=grayscale_probability, seed=seed)
  flips = draws['flip'] if flip else None
  # uint8 stays 0..255 through the crop; the scaling is fused later.
  input_scale = 1. / 255. if images.dtype == tf.uint8 else 1.
  if crop:
    images = batch_crop_and_resize(images, height, width, flip=flips,
                                   windows=draws['windows'],
                                   jit_compile=jit_compile)
  else:
    static = images.shape
    if static.rank is not None and static[1:].is_fully_defined() and (
        tuple(static[1:].as_list()) != (height, width, 3)):
      raise ValueError(f'images must be [B, {height}, {width}, 3] without '
                       f'cropping, got shape {static.as_list()}')
    images = tf.cast(images, tf.float32)
    if flip:
      images = tf.where(flips[:, None, None, None],
                        tf.reverse(images, axis=[2]), images)
  if color_jitter_strength:
    core = _batch_color_core_xla if jit_compile else _batch_color_core
    images = core(images, tf.constant(input_scale), draws['scale'],
                  draws['offset'], draws['contrast'], draws['saturation'],
                  draws['hue'], draws['affine_on'],
                  draws['saturation_on'], draws['hue_on'], draws['gray'])
  elif input_scale != 1.:
    images = images * input_scale
  images = tf.ensure_shape(images, [None, height, width, 3])
  return tf.clip_by_value(images, 0., 1.)


def batch_preprocess_two_views(images, height, width, color_jitter_strength=0.,
                               crop=True, flip=True, impl='simclrv2',
                               jit_compile=True, seed=None):
  """Two independent training views of each image, stacked on channels.

  Both views are computed in one call over a doubled batch (the images
  repeated twice), so each view of each image gets independent randomness.

  Returns:
    [B, height, width, 6] float32 in [0, 1]: view 1 on channels 0-2, view 2
    on 3-5 (the layout of the per-example pretraining pipeline).
  """
  images = tf.convert_to_tensor(images)
  views = batch_preprocess_for_train(
      tf.concat([images, images], axis=0), height, width,
      color_jitter_strength=color_jitter_strength, crop=crop, flip=flip,
      impl=impl, jit_compile=jit_compile, seed=seed)
  first, second = tf.split(views, 2, axis=0)
  return tf.concat([first, second], axis=-1)
