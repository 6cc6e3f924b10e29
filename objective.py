"""Losses: NT-Xent (the normalised temperature-scaled cross entropy of SimCLR)
with negatives from every replica, and the supervised cross entropy."""
import tensorflow as tf

# Subtracted from self-similarity logits so a view is never its own negative.
LARGE_NUM = 1e9


def add_supervised_loss(labels, logits):
  """Mean softmax cross entropy over the local batch; labels are one-hot."""
  return tf.reduce_mean(
      tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def cross_replica_concat(tensor, strategy=None):
  """Concatenates `tensor` along axis 0 over all replicas, in replica order.

  Called in a replica context. With no strategy or one replica it is the
  identity. Gradients flow back to each replica's own slice.
  """
  if strategy is None or strategy.num_replicas_in_sync <= 1:
    return tensor
  num_replicas = strategy.num_replicas_in_sync
  context = tf.distribute.get_replica_context()
  # Each replica writes its rows into its own slot of a zero tensor and a
  # sum over replicas fills every slot; the gradient of the all-reduce is an
  # all-reduce, so each replica's rows get the gradients of every replica's
  # loss (tested against one device in tests/test_numerics.py).
  slots = tf.scatter_nd(
      indices=[[context.replica_id_in_sync_group]], updates=[tensor],
      shape=tf.concat([[num_replicas], tf.shape(tensor)], axis=0))
  slots = context.all_reduce(tf.distribute.ReduceOp.SUM, slots)
  return tf.reshape(slots, tf.concat([[-1], tf.shape(tensor)[1:]], axis=0))


def add_contrastive_loss(hidden, hidden_norm=True, temperature=1.0,
                         strategy=None):
  """NT-Xent loss of a batch of two views.

  Args:
    hidden: [2 * bsz, dim] projections; rows [0, bsz) are view 1 and rows
      [bsz, 2 * bsz) view 2 of the same examples (local to this replica).
    hidden_norm: L2-normalise rows first (cosine similarity).
    temperature: softmax temperature.
    strategy: a `tf.distribute.Strategy` to take negatives from every
      replica (call inside `strategy.run`), or None.

  Returns:
    (loss, logits_ab, labels): the scalar loss averaged over the local
    2 * bsz anchors; logits_ab [bsz, global_bsz], view-1 x view-2
    similarities / temperature; labels [bsz, 2 * global_bsz], one-hot
    positives (this replica's rows are offset by replica_id * bsz).
  """
  if hidden_norm:
    hidden = tf.math.l2_normalize(hidden, -1)
  hidden1, hidden2 = tf.split(hidden, 2, 0)
  batch_size = tf.shape(hidden1)[0]

  hidden1_large = cross_replica_concat(hidden1, strategy)
  hidden2_large = cross_replica_concat(hidden2, strategy)
  if strategy is not None and strategy.num_replicas_in_sync > 1:
    replica_id = tf.cast(
        tf.distribute.get_replica_context().replica_id_in_sync_group,
        tf.int32)
  else:
    replica_id = 0
  enlarged_batch_size = tf.shape(hidden1_large)[0]
  positives = tf.range(batch_size) + replica_id * batch_size
  labels = tf.one_hot(positives, enlarged_batch_size * 2)
  masks = tf.one_hot(positives, enlarged_batch_size)

  logits_aa = tf.matmul(hidden1, hidden1_large, transpose_b=True) / temperature
  logits_aa = logits_aa - masks * LARGE_NUM
  logits_bb = tf.matmul(hidden2, hidden2_large, transpose_b=True) / temperature
  logits_bb = logits_bb - masks * LARGE_NUM
  logits_ab = tf.matmul(hidden1, hidden2_large, transpose_b=True) / temperature
  logits_ba = tf.matmul(hidden2, hidden1_large, transpose_b=True) / temperature

  loss_a = tf.nn.softmax_cross_entropy_with_logits(
      labels, tf.concat([logits_ab, logits_aa], 1))
  loss_b = tf.nn.softmax_cross_entropy_with_logits(
      labels, tf.concat([logits_ba, logits_bb], 1))
  return tf.reduce_mean(loss_a + loss_b), logits_ab, labels
