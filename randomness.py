"""Seeded or unseeded random draws for the augmentations.

Every random function of the augmentations takes an optional `seed`. Left
as None it draws from TensorFlow's ordinary (stateful, global-seed driven)
random ops, so training pipelines behave as usual. Given an int or a
shape-[2] integer tensor it uses stateless ops only, so the same seed gives
the same output (tests, reproducible runs). Sub-steps receive independent
seeds derived with `tf.random.split` (`split_seed`).
"""
import tensorflow as tf


def as_seed(seed):
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


def split_seed(seed, num):
  """Derives `num` independent seeds from `seed` (or `num` Nones if None).

  Splitting (rather than reusing one seed) keeps the random draws of the
  sub-steps of one augmentation statistically independent.
  """
  if seed is None:
    return [None] * num
  parts = tf.random.split(as_seed(seed), num)
  return [parts[i] for i in range(num)]


def uniform(shape, minval, maxval, seed=None):
  """U[minval, maxval) float32: stateful if seed is None, else stateless."""
  if seed is None:
    return tf.random.uniform(shape, minval, maxval, dtype=tf.float32)
  return tf.random.stateless_uniform(shape, seed=as_seed(seed),
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
  coin = uniform([], 0., 1., seed)
  return tf.cond(coin < tf.cast(p, tf.float32), lambda: func(x), lambda: x)
