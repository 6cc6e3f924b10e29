"""SimCLR image augmentations and evaluation preprocessing (core TF only).

Images are float32 tensors of shape [height, width, channels] with values in
[0, 1] unless a function says otherwise (`preprocess_image` also accepts
uint8 and converts it). The pieces follow the original SimCLR (v2) recipe:

* training views: random resized crop (area 8%-100%, aspect 3/4-4/3), random
  horizontal flip, color jitter (p=0.8) and grayscale (p=0.2); the Gaussian
  blur is applied later, batched, by `batch_random_blur` in the model step;
* evaluation: an aspect-preserving center crop keeping 87.5% of the image
  followed by a bicubic resize (or no crop at all for 32x32 data).

The training view exists twice: per example (`preprocess_for_train`, the
original's ops, for tf.data's per-example map) and per batch
(`batch_preprocess_for_train`, vectorised and XLA-compiled, which data.py
uses for small images of one size); with the same random draws the two agree
up to float rounding (see the notes of the batched section).

Every random function takes an optional `seed`. Left as None it draws from
TensorFlow's ordinary (stateful, global-seed driven) random ops, so training
pipelines behave as usual. Given an int or a shape-[2] integer tensor it uses
stateless ops only (`batch_random_blur`: a seeded `tf.random.Generator`), so
the same seed gives the same output; this is meant for tests and reproducible
debugging. Sub-steps receive independent seeds derived with `tf.random.split`.
"""
import numpy as np
import tensorflow as tf


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


def batch_random_blur(images_list, height, width, blur_probability=0.5,
                      seed=None):
  """Blurs each image of each batch in `images_list` with probability p.

  One sigma ~ U(0.1, 2.0) per batch (the original's choice) and a kernel of
  height // 10; each image independently keeps or takes the blurred version.
  Returns a list of [B, H, W, C] batches clipped to [0, 1].
  """
  del width
  rng = tf.random.Generator.from_seed(seed) if seed is not None else None
  uniform = rng.uniform if rng is not None else tf.random.uniform
  blurred_list = []
  for images in images_list:
    sigma = uniform([], 0.1, 2.0, dtype=tf.float32)
    blurred = gaussian_blur(images, kernel_size=height // 10, sigma=sigma)
    take = tf.cast(
        uniform([tf.shape(images)[0], 1, 1, 1], 0, 1, dtype=tf.float32)
        < blur_probability, images.dtype)
    mixed = blurred * take + images * (1 - take)
    blurred_list.append(tf.clip_by_value(mixed, 0., 1.))
  return blurred_list


# Fraction of the shorter (relative to the output aspect) side kept by the
# evaluation center crop; 224 / 256 = 0.875 is the usual ImageNet choice.
CROP_PROPORTION = 0.875


# ------------------------------------------------------------ randomness


def _as_seed(seed):
  """Returns `seed` as a shape-[2] int64 tensor, as stateless ops expect.

  Args:
    seed: a Python int, a scalar integer tensor, or a shape-[2] integer
      tensor / sequence.

  Returns:
    An int64 tensor of shape [2].
  """
  seed = tf.convert_to_tensor(seed)
  if not seed.dtype.is_integer:
    raise ValueError(f'seed must be integer-valued, got dtype {seed.dtype}')
  seed = tf.cast(seed, tf.int64)
  if seed.shape.rank == 0:
    # A plain int: pad with a zero so that small ints still make valid seeds.
    seed = tf.stack([seed, tf.constant(0, tf.int64)])
  return seed


def _split_seed(seed, num):
  """Derives `num` independent seeds from `seed` (or `num` Nones if None).

  Splitting (rather than reusing one seed) keeps the random draws of the
  sub-steps of one augmentation statistically independent.
  """
  if seed is None:
    return [None] * num
  parts = tf.random.split(_as_seed(seed), num)
  return [parts[i] for i in range(num)]


def _uniform(shape, minval, maxval, seed=None):
  """U[minval, maxval) float32: stateful if seed is None, else stateless."""
  if seed is None:
    return tf.random.uniform(shape, minval, maxval, dtype=tf.float32)
  return tf.random.stateless_uniform(shape, seed=_as_seed(seed),
                                     minval=minval, maxval=maxval,
                                     dtype=tf.float32)


def random_apply(func, p, x, seed=None):
  """Returns func(x) with probability p, otherwise x unchanged.

  Args:
    func: callable mapping a tensor to a tensor of the same shape and dtype.
    p: probability (float or scalar tensor) of applying `func`.
    x: the input tensor.
    seed: optional stateless seed for the coin flip.

  Returns:
    A tensor shaped like `x`.
  """
  # tf.cond (not a blend) so that the skipped branch costs nothing.
  coin = _uniform([], 0., 1., seed)
  return tf.cond(coin < tf.cast(p, tf.float32), lambda: func(x), lambda: x)


# ------------------------------------------------------------ color


def to_grayscale(image, keep_channels=True):
  """Converts RGB to luma (ITU-R 601 weights, as tf.image.rgb_to_grayscale).

  Args:
    image: float tensor [..., H, W, 3].
    keep_channels: if True the gray channel is repeated three times so that the
      result can replace an RGB image in the pipeline.

  Returns:
    [..., H, W, 3] if keep_channels else [..., H, W, 1].
  """
  gray = tf.image.rgb_to_grayscale(image)
  if keep_channels:
    # Broadcast: the same values as a concat, a third of the work.
    gray = tf.broadcast_to(gray, tf.shape(image))
  return gray


def random_brightness(image, max_delta, impl='simclrv2', seed=None):
  """Random brightness change.

  Args:
    image: float image [H, W, C].
    max_delta: strength of the change.
    impl: 'simclrv2' scales the image by a factor drawn from
      [max(1 - max_delta, 0), 1 + max_delta]; 'simclrv1' adds an offset drawn
      from [-max_delta, max_delta] (tf.image.random_brightness).
    seed: optional stateless seed.

  Returns:
    The changed image (not clipped), same shape.
  """
  if impl == 'simclrv2':
    # Multiplicative: keeps black black, which the v2 paper preferred.
    lower = max(1.0 - max_delta, 0.0)
    return image * _uniform([], lower, 1.0 + max_delta, seed)
  if impl == 'simclrv1':
    return image + _uniform([], -max_delta, max_delta, seed)
  raise ValueError(f'Unknown impl {impl!r} for random brightness; '
                   "expected 'simclrv2' or 'simclrv1'.")


def _random_contrast(image, amount, seed=None):
  """adjust_contrast with a factor in [1 - amount, 1 + amount]."""
  return tf.image.adjust_contrast(
      image, _uniform([], 1.0 - amount, 1.0 + amount, seed))


def _random_saturation(image, amount, seed=None):
  """adjust_saturation with a factor in [1 - amount, 1 + amount]."""
  return tf.image.adjust_saturation(
      image, _uniform([], 1.0 - amount, 1.0 + amount, seed))


def _random_hue(image, max_delta, seed=None):
  """adjust_hue with a shift (fraction of the hue circle) in +-max_delta."""
  return tf.image.adjust_hue(image, _uniform([], -max_delta, max_delta, seed))


def color_jitter(image, strength, random_order=True, impl='simclrv2',
                 seed=None):
  """SimCLR color distortion: brightness, contrast, saturation and hue.

  Strength s sets brightness, contrast and saturation amounts of 0.8 s and a
  hue shift of up to 0.2 s. After every step the image is clipped to [0, 1],
  as in the original, so each step sees a valid image. An amount of 0 skips
  its step (so strength 0 only clips).

  Args:
    image: float RGB image [H, W, 3] in [0, 1].
    strength: Python float, the color jitter strength s.
    random_order: if True the four steps run in a random order; otherwise in
      the order brightness, contrast, saturation, hue.
    impl: 'simclrv2' (multiplicative brightness) or 'simclrv1' (additive).
    seed: optional stateless seed.

  Returns:
    The distorted image [H, W, 3] in [0, 1].
  """
  amounts = [0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength]
  order_seed, *step_seeds = _split_seed(seed, 5)

  def step(which, x, step_seed):
    """Applies the `which`-th distortion (0..3) to x."""
    amount = amounts[which]
    if amount == 0:
      return x
    if which == 0:
      return random_brightness(x, amount, impl=impl, seed=step_seed)
    if which == 1:
      return _random_contrast(x, amount, step_seed)
    if which == 2:
      return _random_saturation(x, amount, step_seed)
    return _random_hue(x, amount, step_seed)

  with tf.name_scope('color_jitter'):
    if not random_order:
      for i in range(4):
        image = tf.clip_by_value(step(i, image, step_seeds[i]), 0., 1.)
      return image
    # A random permutation of the four steps: argsort of uniform noise works
    # for both the stateful and the stateless case (tf.random.shuffle has no
    # stateless variant).
    order = tf.argsort(_uniform([4], 0., 1., order_seed))
    for position in range(4):
      # The seed belongs to the position, not to the step, so every position
      # draws fresh randomness whichever step lands there.
      branches = [
          (lambda i=i, x=image, s=step_seeds[position]: step(i, x, s))
          for i in range(4)]
      image = tf.clip_by_value(tf.switch_case(order[position], branches),
                               0., 1.)
    return image


def random_color_jitter(image, p=1.0, strength=1.0, impl='simclrv2',
                        seed=None):
  """With probability p: color_jitter with p=0.8, then grayscale with p=0.2.

  Args:
    image: float RGB image [H, W, 3] in [0, 1].
    p: probability of doing anything at all.
    strength: color jitter strength (see `color_jitter`).
    impl: brightness variant, 'simclrv2' or 'simclrv1'.
    seed: optional stateless seed.

  Returns:
    An image [H, W, 3] in [0, 1] (unchanged with probability 1 - p).
  """
  outer, jitter_coin, jitter, gray_coin = _split_seed(seed, 4)

  def transform(x):
    x = random_apply(
        lambda y: color_jitter(y, strength, impl=impl, seed=jitter),
        0.8, x, seed=jitter_coin)
    return random_apply(to_grayscale, 0.2, x, seed=gray_coin)

  return random_apply(transform, p, image, seed=outer)


# ------------------------------------------------------------ cropping


def _compute_crop_shape(image_height, image_width, aspect_ratio,
                        crop_proportion):
  """Size of the largest centered crop of a given aspect ratio, scaled down.

  The crop has the requested aspect ratio (width / height) and keeps
  `crop_proportion` of the image along the side that limits it (the width if
  the requested ratio is wider than the image, else the height); the other
  side keeps at most that proportion. Sizes are rounded half to even
  (tf.math.rint), and the arithmetic order matches the original so that ties
  round the same way.

  Args:
    image_height, image_width: int scalars (Python or tensors).
    aspect_ratio: Python float, width / height of the output.
    crop_proportion: Python float in (0, 1].

  Returns:
    (crop_height, crop_width) as int32 scalar tensors.
  """
  width_f = tf.cast(image_width, tf.float32)
  height_f = tf.cast(image_height, tf.float32)

  def width_limited():
    crop_height = tf.math.rint(crop_proportion / aspect_ratio * width_f)
    crop_width = tf.math.rint(crop_proportion * width_f)
    return tf.cast(crop_height, tf.int32), tf.cast(crop_width, tf.int32)

  def height_limited():
    crop_height = tf.math.rint(crop_proportion * height_f)
    crop_width = tf.math.rint(crop_proportion * aspect_ratio * height_f)
    return tf.cast(crop_height, tf.int32), tf.cast(crop_width, tf.int32)

  return tf.cond(aspect_ratio > width_f / height_f, width_limited,
                 height_limited)


def center_crop_window(image_height, image_width, height, width,
                       crop_proportion=CROP_PROPORTION):
  """The window that `center_crop` cuts out, before resizing.

  Args:
    image_height, image_width: size of the input image.
    height, width: size of the output (only their ratio matters here).
    crop_proportion: see `_compute_crop_shape`.

  Returns:
    (crop_height, crop_width, offset_height, offset_width), int32 scalars.
    The offsets round up ((H - crop_h + 1) // 2), i.e. an odd margin puts the
    extra pixel above / left of the crop, as in the original.
  """
  crop_height, crop_width = _compute_crop_shape(
      image_height, image_width, width / height, crop_proportion)
  offset_height = ((image_height - crop_height) + 1) // 2
  offset_width = ((image_width - crop_width) + 1) // 2
  return crop_height, crop_width, offset_height, offset_width


def center_crop(image, height, width, crop_proportion=CROP_PROPORTION):
  """Aspect-preserving center crop followed by a bicubic resize.

  Args:
    image: float image [H, W, C].
    height, width: output size (Python ints).
    crop_proportion: share of the image kept along the limiting side.

  Returns:
    [height, width, C] float32 image (bicubic can overshoot [0, 1]; callers
    clip).
  """
  shape = tf.shape(image)
  crop_height, crop_width, offset_height, offset_width = center_crop_window(
      shape[0], shape[1], height, width, crop_proportion)
  image = tf.image.crop_to_bounding_box(image, offset_height, offset_width,
                                        crop_height, crop_width)
  return tf.image.resize(image[tf.newaxis], [height, width],
                         method=tf.image.ResizeMethod.BICUBIC)[0]


def distorted_bounding_box_crop(image, bbox, min_object_covered=0.1,
                                aspect_ratio_range=(0.75, 1.33),
                                area_range=(0.05, 1.0), max_attempts=100,
                                seed=None):
  """Crops a random window chosen by sample_distorted_bounding_box.

  Args:
    image: image [H, W, C].
    bbox: float [1, num_boxes, 4] boxes (ymin, xmin, ymax, xmax in [0, 1])
      that the window must overlap by `min_object_covered`; with no boxes the
      whole image counts as the box.
    min_object_covered: minimum covered fraction of a box.
    aspect_ratio_range: allowed window width / height, in pixels.
    area_range: allowed window area as a fraction of the image area.
    max_attempts: tries at finding a valid window; if all fail the whole
      image is returned (the op's own fallback).
    seed: optional stateless seed.

  Returns:
    The cropped image [h, w, C] (size depends on the draw).
  """
  with tf.name_scope('distorted_bounding_box_crop'):
    kwargs = dict(bounding_boxes=bbox, min_object_covered=min_object_covered,
                  aspect_ratio_range=aspect_ratio_range,
                  area_range=area_range, max_attempts=max_attempts,
                  use_image_if_no_bounding_boxes=True)
    if seed is None:
      begin, size, _ = tf.image.sample_distorted_bounding_box(
          tf.shape(image), **kwargs)
    else:
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          tf.shape(image), seed=_as_seed(seed), **kwargs)
    offset_y, offset_x, _ = tf.unstack(begin)
    crop_height, crop_width, _ = tf.unstack(size)
    return tf.image.crop_to_bounding_box(image, offset_y, offset_x,
                                         crop_height, crop_width)


def crop_and_resize(image, height, width, seed=None):
  """Random resized crop (Inception style) to [height, width].

  The window covers 8%-100% of the image area, with an aspect ratio between
  3/4 and 4/3 of the output's own ratio (width / height), so a non-square
  output gets correspondingly shaped windows; after 100 failed draws it is
  the whole image. The window is resized bicubically.

  Args:
    image: float image [H, W, C] in [0, 1], or uint8 (the window is converted
      to [0, 1] after cropping).
    height, width: output size (Python ints).
    seed: optional stateless seed.

  Returns:
    [height, width, C] float32 image (not clipped).
  """
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
  aspect_ratio = width / height
  image = distorted_bounding_box_crop(
      image, whole_image, min_object_covered=0.1,
      aspect_ratio_range=(3. / 4. * aspect_ratio, 4. / 3. * aspect_ratio),
      area_range=(0.08, 1.0), max_attempts=100, seed=seed)
  # uint8 is converted here, window only: the values of converting first.
  image = tf.image.convert_image_dtype(image, tf.float32)
  return tf.image.resize(image[tf.newaxis], [height, width],
                         method=tf.image.ResizeMethod.BICUBIC)[0]


def random_crop_with_resize(image, height, width, p=1.0, seed=None):
  """`crop_and_resize` with probability p (otherwise the image unchanged).

  Args:
    image: float image [H, W, C] in [0, 1], or uint8 (converted).
    height, width: output size.
    p: probability of cropping; with p < 1 the image must already be
      [height, width] for the two branches to agree in shape.
    seed: optional stateless seed.

  Returns:
    [height, width, C] float32 image.
  """
  coin, crop = _split_seed(seed, 2)
  crop_fn = lambda x: crop_and_resize(x, height, width, seed=crop)
  if isinstance(p, (int, float)) and p >= 1:  # No coin: it changes nothing.
    return crop_fn(image)
  return random_apply(crop_fn, p,
                      tf.image.convert_image_dtype(image, tf.float32),
                      seed=coin)


def random_flip_left_right(image, seed=None):
  """Mirrors the image horizontally with probability 1/2.

  Args:
    image: image [H, W, C].
    seed: optional stateless seed.

  Returns:
    Image of the same shape.
  """
  if seed is None:
    return tf.image.random_flip_left_right(image)
  return tf.image.stateless_random_flip_left_right(image, seed=_as_seed(seed))


# ------------------------------------------------------------ pipelines


def _to_output_shape(image, height, width):
  """Reshapes to [height, width, 3], failing clearly on a size mismatch.

  The original relies on tf.reshape here, whose error ("Input to reshape is a
  tensor with N values...") does not say that an uncropped image simply has
  the wrong size. With a static shape we raise ValueError up front; with a
  dynamic one an assertion with the same message guards the reshape.
  """
  message = (f'image must be [{height}, {width}, 3] here (without cropping '
             'no resize happens; crop=True / test_crop=True resizes)')
  static = image.shape
  if static.rank is not None and static.is_fully_defined():
    if tuple(static.as_list()) != (height, width, 3):
      raise ValueError(f'{message}, got shape {static.as_list()}')
    return tf.reshape(image, [height, width, 3])
  with tf.control_dependencies([tf.debugging.assert_equal(
      tf.shape(image), tf.constant([height, width, 3]),
      message=message)]):
    return tf.reshape(image, [height, width, 3])


def preprocess_for_train(image, height, width, color_jitter_strength=0.,
                         crop=True, flip=True, impl='simclrv2', seed=None):
  """One SimCLR training view of a float image.

  Args:
    image: float image [H, W, 3] in [0, 1], or uint8 (converted; with a
      crop, only the window).
    height, width: output size.
    color_jitter_strength: strength s of `random_color_jitter` (jitter p=0.8,
      grayscale p=0.2). 0 turns the whole color distortion off (the
      original's color_distort=False), grayscale included.
    crop: random resized crop to [height, width]; if False the image must
      already have that size.
    flip: random horizontal flip.
    impl: brightness variant for the color jitter.
    seed: optional stateless seed.

  Returns:
    [height, width, 3] float32 image in [0, 1].

  Raises:
    ValueError: crop=False and the image's static shape is not
      [height, width, 3].
  """
  crop_seed, flip_seed, color_seed = _split_seed(seed, 3)
  if crop:
    image = random_crop_with_resize(image, height, width, seed=crop_seed)
  else:
    image = tf.image.convert_image_dtype(image, tf.float32)
  if flip:
    image = random_flip_left_right(image, seed=flip_seed)
  if color_jitter_strength:
    image = random_color_jitter(image, strength=color_jitter_strength,
                                impl=impl, seed=color_seed)
  image = _to_output_shape(image, height, width)
  # Bicubic resizing and brightness can leave [0, 1].
  return tf.clip_by_value(image, 0., 1.)


def preprocess_for_eval(image, height, width, crop=True):
  """Deterministic evaluation preprocessing of a float image.

  Args:
    image: float image [H, W, 3] in [0, 1].
    height, width: output size.
    crop: center crop (CROP_PROPORTION) and bicubic resize; if False the image
      must already be [height, width, 3] (CIFAR-sized data).

  Returns:
    [height, width, 3] float32 image in [0, 1].

  Raises:
    ValueError: crop=False and the image's static shape is not
      [height, width, 3].
  """
  if crop:
    image = center_crop(image, height, width, crop_proportion=CROP_PROPORTION)
  image = _to_output_shape(image, height, width)
  # Bicubic interpolation overshoots near edges.
  return tf.clip_by_value(image, 0., 1.)


def preprocess_image(image, height, width, is_training=False,
                     color_jitter_strength=0., test_crop=True, seed=None):
  """Converts an image to float32 in [0, 1] and preprocesses it.

  Args:
    image: [H, W, 3] image, uint8 (scaled by 1/255) or float (kept as is).
    height, width: output size.
    is_training: a random training view if True, else evaluation
      preprocessing.
    color_jitter_strength: see `preprocess_for_train` (training only).
    test_crop: center crop at evaluation (the original pipeline uses it when
      the image size is above 32).
    seed: optional stateless seed (training only; evaluation is
      deterministic).

  Returns:
    [height, width, 3] float32 image in [0, 1].

  Raises:
    ValueError: no crop is requested and the image's static shape is not
      [height, width, 3].
  """
  if is_training:
    # uint8 goes in as it is: the crop converts only its window.
    return preprocess_for_train(image, height, width,
                                color_jitter_strength=color_jitter_strength,
                                seed=seed)
  image = tf.image.convert_image_dtype(image, dtype=tf.float32)
  return preprocess_for_eval(image, height, width, crop=test_crop)


# ------------------------------------------------------------ batched path
#
# Vectorised counterparts of `preprocess_for_train` for a whole batch at once
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
  return _uniform(shape, minval, maxval, seed)


def batch_sample_crop_windows(batch_size, image_height, image_width,
                              aspect_ratio_range=(0.75, 4. / 3.),
                              area_range=(0.08, 1.0), min_object_covered=0.1,
                              max_attempts=100, seed=None):
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
  ar_seed, h_seed, y_seed, x_seed = _split_seed(seed, 4)
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


# Keys cubic convolution (a = -0.5) sampled at offsets i / 1024 as TF's
# ResizeBicubic kernel tabulates it (in double precision, stored as float32):
# column 0 weighs the taps at distance t, column 1 those at distance 1 + t.
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
        aspect_ratio_range=(3. / 4. * aspect_ratio, 4. / 3. * aspect_ratio),
        area_range=(0.08, 1.0), min_object_covered=0.1, max_attempts=100,
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
  amount = 0.8 * strength
  order_seed, b_seed, c_seed, s_seed, h_seed = _split_seed(seed, 5)
  if impl == 'simclrv2':
    brightness = _uniform([batch], max(1.0 - amount, 0.0), 1.0 + amount,
                          b_seed)
  else:
    brightness = _uniform([batch], -amount, amount, b_seed)
  draws = [brightness,
           _uniform([batch], 1.0 - amount, 1.0 + amount, c_seed),
           _uniform([batch], 1.0 - amount, 1.0 + amount, s_seed),
           _uniform([batch], -0.2 * strength, 0.2 * strength, h_seed)]
  neutral = [1. if impl == 'simclrv2' else 0., 1., 1., 0.]
  if random_order:
    order = tf.argsort(_uniform(tf.stack([batch, 4]), 0., 1., order_seed),
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
  amounts = [amount, amount, amount, 0.2 * strength]
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
                      impl='simclrv2', jitter_probability=0.8,
                      grayscale_probability=0.2, seed=None):
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
  crop_seed, flip_seed, coin_seed, jitter_seed, gray_seed = _split_seed(
      seed, 5)
  draws = {}
  if crop:
    aspect_ratio = width / height
    draws['windows'] = batch_sample_crop_windows(
        batch, image_height, image_width,
        aspect_ratio_range=(3. / 4. * aspect_ratio, 4. / 3. * aspect_ratio),
        area_range=(0.08, 1.0), min_object_covered=0.1, max_attempts=100,
        seed=crop_seed)
  if flip:
    draws['flip'] = _uniform([batch], 0., 1., flip_seed) < 0.5
  if color_jitter_strength:
    draws['jitter'] = _uniform([batch], 0., 1., coin_seed) < jitter_probability
    draws['gray'] = _uniform([batch], 0., 1., gray_seed) < (
        grayscale_probability)
    draws.update(batch_color_params(batch, color_jitter_strength,
                                    apply=draws['jitter'], impl=impl,
                                    seed=jitter_seed))
  return draws


def batch_preprocess_for_train(images, height, width, color_jitter_strength=0.,
                               crop=True, flip=True, impl='simclrv2',
                               jitter_probability=0.8,
                               grayscale_probability=0.2, jit_compile=True,
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
