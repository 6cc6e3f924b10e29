"""The outputs of an encoder for every real example of a distributed eval
dataset (data.build_distributed_dataset, is_training=False): the kNN
monitor's features and --mode=embed's."""
import numpy as np
import tensorflow as tf


class FeatureExtractor:
  """`encode(images)` for every example of an eval dataset, exactly once.

  `encode(images [b, H, W, 3])` returns a tensor [b, D] or a dict of them
  and runs in every replica (one traced function, reused). Its outputs,
  with the labels, are gathered from all replicas (`strategy.gather`,
  across workers too) and the padding examples (mask 0) dropped, so every
  example of the split counts exactly once.
  """

  def __init__(self, strategy, encode):
    def replica_fn(images, labels):
      out = {'features': encode(images), 'mask': labels['mask']}
      # The int label and the position in the split, when the pipeline
      # carries them (with_index); else the class of the one-hot label.
      out['label'] = (labels['label'] if 'label' in labels else
                      tf.argmax(labels['labels'], 1))
      if 'index' in labels:
        out['index'] = labels['index']
      return out

    @tf.function
    def step(iterator):
      outputs = strategy.run(replica_fn, next(iterator))
      return tf.nest.map_structure(
          lambda value: strategy.gather(value, axis=0), outputs)

    self._step = step

  def batches(self, dataset, steps):
    """Yields, per step, {'features': array or dict of arrays, 'label': [b],
    and 'index': [b] with the pipeline's `with_index`} of the step's real
    examples (numpy; b varies)."""
    iterator = iter(dataset)
    for _ in range(steps):
      outputs = self._step(iterator)
      keep = outputs.pop('mask').numpy() > 0
      yield tf.nest.map_structure(lambda value: value.numpy()[keep], outputs)

  def __call__(self, dataset, steps):
    """The `batches` concatenated: the same structure over every example."""
    parts = list(self.batches(dataset, steps))
    return tf.nest.map_structure(lambda *arrays: np.concatenate(arrays),
                                 *parts)
