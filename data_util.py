"""SimCLR image preprocessing: the original data_util's public functions,
and the evaluation preprocessing (core TF only).

Images are float32 tensors of shape [height, width, channels] with values in
[0, 1] unless a function says otherwise (`preprocess_image` also accepts
uint8 and converts it). The recipe (augmentation_recipe.py) is the original
SimCLR (v2) one:

* training views: random resized crop, random horizontal flip, colour
  jitter and grayscale, per example (augment_example.py, the original's ops,
  for tf.data's per-example map) or per batch (augment_batch.py, vectorised
  and XLA-compiled, which data.py uses for small images of one size); the
  Gaussian blur is applied later, batched, by `batch_random_blur` in the
  model step;
* evaluation (here): an aspect-preserving center crop keeping 87.5% of the
  image followed by a bicubic resize (or no crop at all for 32x32 data).

Every random function takes an optional stateless `seed` (randomness.py).
The names below are the original data_util's (and those of the batched
path), so code written against it keeps working.
"""
import tensorflow as tf

# pylint: disable=unused-import
from augment_batch import batch_color_jitter
from augment_batch import batch_color_params
from augment_batch import batch_crop_and_resize
from augment_batch import batch_preprocess_for_train
from augment_batch import batch_preprocess_two_views
from augment_batch import batch_random_blur
from augment_batch import batch_sample_crop_windows
from augment_batch import batch_train_draws
from augment_batch import bicubic_resize_matrix
from augment_batch import gaussian_blur
import augment_example
from augment_example import color_jitter
from augment_example import crop_and_resize
from augment_example import distorted_bounding_box_crop
from augment_example import preprocess_for_train
from augment_example import random_brightness
from augment_example import random_color_jitter
from augment_example import random_crop_with_resize
from augment_example import random_flip_left_right
from augment_example import to_grayscale
import augmentation_recipe as recipe
from randomness import random_apply
# pylint: enable=unused-import

# Fraction of the shorter (relative to the output aspect) side kept by the
# evaluation center crop.
CROP_PROPORTION = recipe.EVAL_CROP_PROPORTION


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
  image = augment_example.to_output_shape(image, height, width)
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
    return augment_example.preprocess_for_train(
        image, height, width, color_jitter_strength=color_jitter_strength,
        seed=seed)
  image = tf.image.convert_image_dtype(image, dtype=tf.float32)
  return preprocess_for_eval(image, height, width, crop=test_crop)
