"""The SimCLR training view of one image (the original's ops, for tf.data's
per-example map): random resized crop, horizontal flip, colour jitter and
grayscale, with the probabilities and ranges of augmentation_recipe.py.

Images are float32 [height, width, channels] in [0, 1] unless a function
says otherwise; every random function takes an optional stateless `seed`
(randomness.py). The Gaussian blur is applied later, to whole batches, in
the model (augment_batch.batch_random_blur).
"""
import tensorflow as tf

import augmentation_recipe as recipe
import randomness


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
    return image * randomness.uniform([], lower, 1.0 + max_delta, seed)
  if impl == 'simclrv1':
    return image + randomness.uniform([], -max_delta, max_delta, seed)
  raise ValueError(f'Unknown impl {impl!r} for random brightness; '
                   "expected 'simclrv2' or 'simclrv1'.")


def _random_contrast(image, amount, seed=None):
  """adjust_contrast with a factor in [1 - amount, 1 + amount]."""
  return tf.image.adjust_contrast(
      image, randomness.uniform([], 1.0 - amount, 1.0 + amount, seed))


def _random_saturation(image, amount, seed=None):
  """adjust_saturation with a factor in [1 - amount, 1 + amount]."""
  return tf.image.adjust_saturation(
      image, randomness.uniform([], 1.0 - amount, 1.0 + amount, seed))


def _random_hue(image, max_delta, seed=None):
  """adjust_hue with a shift (fraction of the hue circle) in +-max_delta."""
  return tf.image.adjust_hue(
      image, randomness.uniform([], -max_delta, max_delta, seed))


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
  amount = recipe.JITTER_AMOUNT * strength
  amounts = [amount, amount, amount, recipe.HUE_AMOUNT * strength]
  order_seed, *step_seeds = randomness.split_seed(seed, 5)

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
    order = tf.argsort(randomness.uniform([4], 0., 1., order_seed))
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
  outer, jitter_coin, jitter, gray_coin = randomness.split_seed(seed, 4)

  def transform(x):
    x = randomness.random_apply(
        lambda y: color_jitter(y, strength, impl=impl, seed=jitter),
        recipe.COLOR_JITTER_PROBABILITY, x, seed=jitter_coin)
    return randomness.random_apply(to_grayscale, recipe.GRAYSCALE_PROBABILITY,
                                   x, seed=gray_coin)

  return randomness.random_apply(transform, p, image, seed=outer)


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
          tf.shape(image), seed=randomness.as_seed(seed), **kwargs)
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
      image, whole_image, min_object_covered=recipe.CROP_MIN_OBJECT_COVERED,
      aspect_ratio_range=tuple(r * aspect_ratio
                               for r in recipe.CROP_ASPECT_RATIO_RANGE),
      area_range=recipe.CROP_AREA_RANGE, max_attempts=recipe.CROP_MAX_ATTEMPTS,
      seed=seed)
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
  coin, crop = randomness.split_seed(seed, 2)
  crop_fn = lambda x: crop_and_resize(x, height, width, seed=crop)
  if isinstance(p, (int, float)) and p >= 1:  # No coin: it changes nothing.
    return crop_fn(image)
  return randomness.random_apply(crop_fn, p,
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
  return tf.image.stateless_random_flip_left_right(
      image, seed=randomness.as_seed(seed))


def to_output_shape(image, height, width):
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
  crop_seed, flip_seed, color_seed = randomness.split_seed(seed, 3)
  if crop:
    image = random_crop_with_resize(image, height, width, seed=crop_seed)
  else:
    image = tf.image.convert_image_dtype(image, tf.float32)
  if flip:
    image = random_flip_left_right(image, seed=flip_seed)
  if color_jitter_strength:
    image = random_color_jitter(image, strength=color_jitter_strength,
                                impl=impl, seed=color_seed)
  image = to_output_shape(image, height, width)
  # Bicubic resizing and brightness can leave [0, 1].
  return tf.clip_by_value(image, 0., 1.)
