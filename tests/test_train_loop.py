"""runtime.make_train_loop: the reported means per window against values
computed by hand, on one and two replicas; the stop flag; summary tags."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import runtime


def _loop_on(strategy, tmp_path, summary_steps, stop=False):
  """Runs the loop over batches 0..7 (example i of batch b holds 8b + i);
  each step's metric value is the replica's mean example. Returns (reports,
  returned means, optimizer steps, {tag: [steps]})."""
  data = tf.data.Dataset.range(64).map(
      lambda i: (tf.cast(i, tf.float32), {'labels': tf.zeros([1])})).batch(8)
  with strategy.scope():
    weight = tf.Variable(0.)
    optimizer = keras.optimizers.SGD(0.)
    metrics = {'value': keras.metrics.Mean('value')}
  flag = tf.Variable(stop, trainable=False)

  def replica_step(images, labels):
    del labels
    metrics['value'].update_state(images)
    optimizer.apply_gradients([(tf.constant(0.), weight)])

  reports = []
  loop = runtime.make_train_loop(
      strategy, replica_step, metrics, optimizer.iterations, summary_steps,
      report=lambda step, values: reports.append((step, values['value'])),
      learning_rate=lambda step: step * 10., stop_flag=flag)
  writer = tf.summary.create_file_writer(str(tmp_path))
  iterator = iter(strategy.experimental_distribute_dataset(data))
  with writer.as_default():
    first = loop(iterator, tf.constant(5))
    second = loop(iterator, tf.constant(3))
  writer.flush()
  tags = {}
  for event_file in tmp_path.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(
            (event.step, float(tf.make_ndarray(value.tensor))))
  returned = [float(first['value']), float(second['value'])]
  return reports, returned, int(optimizer.iterations.numpy()), tags


@pytest.mark.parametrize('replicas', [1, 2])
def test_windows_of_summary_steps_and_the_call_end(replicas, mirrored2,
                                                   tmp_path):
  strategy = mirrored2 if replicas == 2 else tf.distribute.get_strategy()
  reports, returned, steps, tags = _loop_on(strategy, tmp_path, 2)
  # Batch b's mean is 8b + 3.5. Call 1 runs steps 1-5: windows {1, 2},
  # {3, 4} and {5} at the call's end; call 2 steps 6-8: {6} (step 6 is a
  # summary step), {7, 8} at the end.
  batch_mean = lambda b: 8 * b + 3.5
  expected = [(2, (batch_mean(0) + batch_mean(1)) / 2),
              (4, (batch_mean(2) + batch_mean(3)) / 2),
              (5, batch_mean(4)), (6, batch_mean(5)),
              (8, (batch_mean(6) + batch_mean(7)) / 2)]
  assert [s for s, _ in reports] == [s for s, _ in expected]
  np.testing.assert_allclose([v for _, v in reports],
                             [v for _, v in expected], rtol=1e-6)
  assert returned == pytest.approx([batch_mean(4),
                                    (batch_mean(6) + batch_mean(7)) / 2])
  assert steps == 8
  assert sorted(tags) == ['learning_rate', 'train/value']
  np.testing.assert_allclose(tags['train/value'], expected, rtol=1e-6)
  # The rate of the step just taken: learning_rate(step - 1).
  np.testing.assert_allclose(tags['learning_rate'],
                             [(s, (s - 1) * 10.) for s, _ in expected])


def test_a_stop_request_ends_the_call_before_its_next_step(tmp_path):
  reports, returned, steps, _ = _loop_on(tf.distribute.get_strategy(),
                                         tmp_path, 2, stop=True)
  assert (reports, returned, steps) == ([], [0., 0.], 0)
