"""SimCLR image augmentations and evaluation preprocessing (core TF only).

This module so far holds the Gaussian blur, which the model applies batched
during pretraining; the rest of the augmentations arrive with the input
pipeline.
"""
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
