"""Training metrics computed inside the step, and images for summaries."""
import tensorflow as tf


def contrastive_accuracy(logits_con, labels_con):
  """Fraction of view-1 anchors whose most similar view 2 is their positive."""
  correct = tf.equal(tf.argmax(labels_con, 1), tf.argmax(logits_con, 1))
  return tf.reduce_mean(tf.cast(correct, tf.float32))


def contrastive_entropy(logits_con):
  """Mean entropy of the softmax over view-2 candidates (a collapse signal)."""
  prob = tf.nn.softmax(logits_con)
  return -tf.reduce_mean(tf.reduce_sum(prob * tf.math.log(prob + 1e-8), -1))


def supervised_accuracy(labels, logits):
  correct = tf.equal(tf.argmax(labels, 1), tf.argmax(logits, 1))
  return tf.reduce_mean(tf.cast(correct, tf.float32))


def view_pairs(images, count=4):
  """[count, H, W * views, 3]: each example's views side by side, to look at."""
  views = tf.split(images[:count], images.shape[-1] // 3, axis=-1)
  return tf.concat(views, axis=2)
