"""Weighted k-nearest-neighbour accuracy of encoder features: the kNN monitor.

A measure of how well a representation separates the classes that trains
nothing, so it is cheap enough to run while pretraining (Wu et al. 2018,
"Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
section 3.4): each eval example's feature is compared by cosine similarity with
a bank of train features; its k most similar bank entries vote for their
classes, each with weight exp(similarity / T); the class with the largest total
is the prediction.

- `knn_class_scores`, `knn_predict`, `knn_accuracy`: the computation on arrays
  (pure functions of their arguments).
- `KnnMonitor`: the two pipelines of a run (bank: the first `knn_bank_size`
  train examples; queries: the eval split, every example once), both with
  eval preprocessing, built once and reused at every evaluation.

Ties are broken deterministically: among bank entries equally similar at the
k-th place the lower bank index is taken (`tf.math.top_k`'s order), and among
classes with equal vote totals the lower class index wins.
"""
import dataclasses
import time

import numpy as np
import tensorflow as tf

import data as data_lib
import feature_extractor


def _normalized(features):
  return tf.math.l2_normalize(tf.convert_to_tensor(features, tf.float32),
                              axis=1)


def knn_class_scores(queries, bank, bank_labels, num_classes, k=200,
                     temperature=0.1):
  """Weighted votes of each query's k nearest bank features.

  Args:
    queries: [Q, D] features.
    bank: [N, D] features (N >= 1).
    bank_labels: [N] integer classes in [0, num_classes).
    num_classes: C.
    k: neighbours per query (min(k, N) are used).
    temperature: T of the weights exp(similarity / T).

  Returns:
    [Q, C] float32: row q holds, per class, the sum over q's nearest bank
    entries of that class of exp((s - s_max) / T), with s the cosine
    similarity and s_max the row's largest one: exp(s / T) up to a factor per
    row, which changes no prediction and keeps small temperatures finite.
  """
  bank = _normalized(bank)
  sims = tf.matmul(_normalized(queries), bank, transpose_b=True)  # [Q, N]
  top_sims, top_index = tf.math.top_k(sims, k=min(k, int(bank.shape[0])))
  weights = tf.exp((top_sims - top_sims[:, :1]) / temperature)  # [Q, k]
  top_labels = tf.gather(tf.convert_to_tensor(bank_labels, tf.int64),
                         top_index)
  votes = tf.one_hot(top_labels, num_classes) * weights[..., None]
  return tf.reduce_sum(votes, axis=1)


def _first_argmax(scores):
  """[Q] the lowest index of each row's maximum (tf.argmax leaves ties open)."""
  num_classes = scores.shape[1]
  best = tf.reduce_max(scores, axis=1, keepdims=True)
  index = tf.range(num_classes, dtype=tf.int64)[None]
  above = tf.constant(num_classes, tf.int64)
  return tf.reduce_min(tf.where(scores >= best, index, above), axis=1)


def knn_predict(queries, bank, bank_labels, num_classes, k=200,
                temperature=0.1, batch_size=1024):
  """[Q] int64 numpy: the weighted k-NN class of every query.

  Arguments as for `knn_class_scores`; queries are processed `batch_size` at a
  time so that the [batch, N] similarity matrix stays small.
  """
  queries = np.asarray(queries, np.float32)
  if len(bank) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError('kNN needs a non-empty feature bank.')
  bank = _normalized(bank)  # once, not per batch
  predictions = [np.zeros([0], np.int64)]
  for start in range(0, len(queries), batch_size):
    scores = knn_class_scores(queries[start:start + batch_size], bank,
                              bank_labels, num_classes, k, temperature)
    predictions.append(_first_argmax(scores).numpy())
  return np.concatenate(predictions)


def knn_accuracy(queries, query_labels, bank, bank_labels, num_classes,
                 k=200, temperature=0.1, batch_size=1024):
  """Fraction of queries whose weighted k-NN class is their label."""
  if len(queries) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError('kNN accuracy needs at least one query.')
  predicted = knn_predict(queries, bank, bank_labels, num_classes, k,
                          temperature, batch_size)
  return float(np.mean(predicted == np.asarray(query_labels)))


@dataclasses.dataclass(frozen=True)
class KnnResult:
  top_1_accuracy: float
  num_queries: int
  num_bank: int
  seconds: float


class KnnMonitor:
  """The kNN accuracy of an encoder on a run's eval split.

  Args:
    source: a dataset source (`data.get_source`).
    strategy: the run's `tf.distribute` strategy.
    config: the run's `Config`: `train_split` and `knn_bank_size` (the bank),
      `eval_split` and `eval_steps` (the queries: the whole split unless
      `eval_steps` > 0), `eval_batch_size`, `knn_k`, `knn_temperature`.
    encode: `images [b, H, W, 3] -> features [b, D]`, e.g. the encoder with
      training=False; called in each replica.
  """

  def __init__(self, source, strategy, config, encode):
    replicas = strategy.num_replicas_in_sync
    batch = config.eval_batch_size
    self.num_classes = source.num_classes
    self.k, self.temperature = config.knn_k, config.knn_temperature
    bank_size = data_lib.num_eval_examples(source, config.train_split,
                                           config.knn_bank_size)
    self._bank_steps = data_lib.eval_steps(bank_size, batch, replicas)
    self._query_steps = config.eval_steps or data_lib.eval_steps(
        source.num_examples(config.eval_split), batch, replicas)
    with strategy.scope():
      self._bank_data = data_lib.build_distributed_dataset(
          source, batch, False, strategy, config, split=config.train_split,
          max_examples=config.knn_bank_size)
      self._query_data = data_lib.build_distributed_dataset(
          source, batch, False, strategy, config)
    self._extract = feature_extractor.FeatureExtractor(strategy, encode)

  def features(self):
    """(bank, bank_labels, queries, query_labels), numpy, of the encoder now."""
    bank = self._extract(self._bank_data, self._bank_steps)
    queries = self._extract(self._query_data, self._query_steps)
    return (bank['features'], bank['label'], queries['features'],
            queries['label'])

  def evaluate(self):
    """A `KnnResult` for the encoder's current weights."""
    start = time.time()
    bank, bank_labels, queries, labels = self.features()
    accuracy = knn_accuracy(queries, labels, bank, bank_labels,
                            self.num_classes, self.k, self.temperature)
    return KnnResult(accuracy, len(queries), len(bank), time.time() - start)
