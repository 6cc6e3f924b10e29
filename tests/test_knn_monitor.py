"""The kNN monitor: weighted voting against hand-computed values and a numpy
reference, ties, the feature gathering over replicas, and run.py's use of it."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
import data as data_lib
import data_util
import knn_monitor
from config import Config


def reference_scores(queries, bank, labels, num_classes, k, temperature):
  """Plain numpy, float64: sum of exp(cos / T) over the k nearest per class."""
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  scores = np.zeros([len(q), num_classes])
  for i, sims in enumerate(q @ b.T):
    # Most similar first; equal similarities: the lower bank index first.
    order = sorted(range(len(b)), key=lambda j: (-sims[j], j))[:k]
    for j in order:
      scores[i, labels[j]] += math.exp(sims[j] / temperature)
  return scores


def reference_predict(scores):
  # np.argmax returns the first maximum: the lower class index on ties.
  return np.argmax(scores, axis=1)


def unshifted(scores, queries, bank, temperature):
  """Undo knn_class_scores' per-row factor exp(-s_max / T)."""
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  s_max = (q @ b.T).max(axis=1, keepdims=True)
  return np.asarray(scores, np.float64) * np.exp(s_max / temperature)


def test_weighted_vote_by_hand():
  # One class-1 neighbour at cosine 1 against three class-0 ones at 0.6.
  query = np.array([[2., 0.]])   # norms do not matter: cosine similarity
  bank = np.array([[1., 0.], [3., 4.], [0.6, 0.8], [1.5, 2.]])
  labels = np.array([1, 0, 0, 0])
  # T = 0.1: class 1 gets e^10 = 22026.5, class 0 gets 3 e^6 = 1210.3.
  scores = knn_monitor.knn_class_scores(query, bank, labels, 2, k=4,
                                        temperature=0.1)
  np.testing.assert_allclose(unshifted(scores, query, bank, 0.1),
                             [[3 * math.exp(6), math.exp(10)]], rtol=1e-5)
  assert knn_monitor.knn_predict(query, bank, labels, 2, k=4,
                                 temperature=0.1).tolist() == [1]
  # T = 1: class 0 wins, 3 e^0.6 = 5.47 against e^1 = 2.72; a plain
  # majority vote would too, and with k = 1 the nearest alone decides.
  assert knn_monitor.knn_predict(query, bank, labels, 2, k=4,
                                 temperature=1.).tolist() == [0]
  assert knn_monitor.knn_predict(query, bank, labels, 2, k=1,
                                 temperature=1.).tolist() == [1]
  assert knn_monitor.knn_accuracy(query, [1], bank, labels, 2, k=4,
                                  temperature=0.1) == 1.0


def test_ties_lower_bank_index_then_lower_class():
  query = np.array([[1., 0.]])
  bank = np.array([[0., 1.], [0., -1.], [1., 0.]])  # classes 2, 1, 0
  labels = np.array([2, 1, 0])
  # k = 2: bank entries 0 and 1 are equally similar (cosine 0) for the second
  # place; the lower bank index (class 2) is taken, class 1 gets nothing.
  scores = knn_monitor.knn_class_scores(query, bank, labels, 3, k=2,
                                        temperature=0.1)
  np.testing.assert_allclose(unshifted(scores, query, bank, 0.1),
                             [[math.exp(10), 0., 1.]], rtol=1e-6)
  # Without the class-0 entry, classes 2 and 1 tie exactly (e^0 each): the
  # lower class index, 1, wins although class 2 comes first in the bank.
  assert knn_monitor.knn_predict(query, bank[:2], labels[:2], 3, k=2,
                                 temperature=0.1).tolist() == [1]
  np.testing.assert_allclose(
      knn_monitor.knn_class_scores(query, bank[:2], labels[:2], 3, k=2,
                                   temperature=0.1), [[0., 1., 1.]])


@pytest.mark.parametrize('k,temperature', [(20, 0.1), (500, 0.5), (1, 0.1)])
def test_matches_numpy_reference(k, temperature):
  rng = np.random.RandomState(0)
  queries = rng.randn(50, 16)
  bank = rng.randn(300, 16)
  labels = rng.randint(0, 5, 300)
  expected = reference_scores(queries, bank, labels, 5, k, temperature)
  scores = knn_monitor.knn_class_scores(queries, bank, labels, 5, k,
                                        temperature)
  np.testing.assert_allclose(unshifted(scores, queries, bank, temperature),
                             expected, rtol=1e-4)
  # Batched (7 queries at a time) and k > bank size (500 -> all 300).
  predicted = knn_monitor.knn_predict(queries, bank, labels, 5, k,
                                      temperature, batch_size=7)
  np.testing.assert_array_equal(predicted, reference_predict(expected))
  # Cosine similarity: positive rescaling of any feature changes nothing.
  scaled = knn_monitor.knn_predict(queries * rng.uniform(0.1, 10, [50, 1]),
                                   bank * rng.uniform(0.1, 10, [300, 1]),
                                   labels, 5, k, temperature)
  np.testing.assert_array_equal(scaled, predicted)
  query_labels = rng.randint(0, 5, 50)
  assert knn_monitor.knn_accuracy(queries, query_labels, bank, labels, 5, k,
                                  temperature) == pytest.approx(
                                      np.mean(predicted == query_labels))


def test_small_temperature_stays_finite():
  rng = np.random.RandomState(1)
  queries, bank = rng.randn(20, 8), rng.randn(100, 8)
  labels = rng.randint(0, 4, 100)
  scores = knn_monitor.knn_class_scores(queries, bank, labels, 4, k=50,
                                        temperature=1e-3).numpy()
  assert np.all(np.isfinite(scores))  # exp(1 / 1e-3) would overflow
  nearest = labels[np.argmax(queries @ (
      bank / np.linalg.norm(bank, axis=1, keepdims=True)).T, axis=1)]
  predicted = knn_monitor.knn_predict(queries, bank, labels, 4, k=50,
                                      temperature=1e-3)
  np.testing.assert_array_equal(predicted, nearest)


def test_empty_inputs_are_refused():
  with pytest.raises(ValueError, match='bank'):
    knn_monitor.knn_predict(np.ones([2, 3]), np.zeros([0, 3]), [], 2)
  with pytest.raises(ValueError, match='query'):
    knn_monitor.knn_accuracy(np.zeros([0, 3]), [], np.ones([2, 3]), [0, 1], 2)


CFG = dict(dataset='shapes10', train_split='train', eval_split='test',
           image_size=32, eval_batch_size=48, knn_bank_size=300)


def _mean_colour(images):
  return tf.reduce_mean(images, axis=[1, 2])


def _sorted_rows(features, labels):
  rows = np.concatenate([features, labels[:, None]], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


def test_features_count_each_example_once_over_two_replicas(shapes10_dir,
                                                            mirrored2):
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  cfg = Config(train_mode='pretrain', **CFG)
  one = knn_monitor.KnnMonitor(source, tf.distribute.get_strategy(), cfg,
                               _mean_colour)
  two = knn_monitor.KnnMonitor(source, mirrored2, cfg, _mean_colour)
  bank1, bank_labels1, queries1, labels1 = one.features()
  bank2, bank_labels2, queries2, labels2 = two.features()
  assert len(bank1) == 300 and len(queries1) == 1000
  assert np.bincount(labels1).tolist() == [100] * 10
  # The same examples (in another order): the first 300 train examples and
  # every test example, once each, padding dropped.
  np.testing.assert_allclose(_sorted_rows(bank2, bank_labels2),
                             _sorted_rows(bank1, bank_labels1), atol=1e-6)
  np.testing.assert_allclose(_sorted_rows(queries2, labels2),
                             _sorted_rows(queries1, labels1), atol=1e-6)
  first = next(iter(source.as_dataset('train').take(300).batch(300)))
  np.testing.assert_array_equal(np.sort(bank_labels1),
                                np.sort(first['label'].numpy()))
  result = two.evaluate()
  assert (result.num_queries, result.num_bank) == (1000, 300)
  assert result.top_1_accuracy == pytest.approx(knn_monitor.knn_accuracy(
      queries1, labels1, bank1, bank_labels1, 10))
  # Bank 0 means the whole train split; eval_steps limits the queries.
  whole = knn_monitor.KnnMonitor(
      source, mirrored2, cfg.replace(knn_bank_size=0, eval_steps=2),
      _mean_colour).evaluate()
  assert (whole.num_queries, whole.num_bank) == (96, 5000)


def run_py(*args):
  proc = subprocess.run([sys.executable, str(conftest.ROOT / 'run.py'),
                         *args], cwd=conftest.ROOT, capture_output=True,
                        text=True, timeout=600,
                        env={'TF_CPP_MIN_LOG_LEVEL': '2',
                             'CUDA_VISIBLE_DEVICES': '', 'PATH': ''})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def tiny_run(shapes10_dir, model_dir):
  return ['--use_tpu=False', '--dataset=shapes10',
          f'--data_dir={shapes10_dir}', '--eval_split=test',
          '--resnet_depth=18', '--image_size=32', '--train_batch_size=8',
          '--train_steps=4', '--checkpoint_steps=4', '--eval_batch_size=50',
          '--eval_steps=2', '--use_blur=False', '--mode=train_then_eval',
          f'--model_dir={model_dir}']


@pytest.fixture(scope='module')
def pretrained_with_monitor(shapes10_dir, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp('pretrain_knn')
  proc = run_py(*tiny_run(shapes10_dir, model_dir), '--train_mode=pretrain',
                '--train_summary_steps=1', '--knn_monitor_steps=2',
                '--knn_bank_size=100')
  return model_dir, proc


def exported_outputs(model_dir, shapes10_dir, split, count=100):
  """(final_avg_pool, logits_sup, labels) of the first `count` examples of
  a shapes10 split (eval preprocessing) through model_dir's step-4 export."""
  loaded = tf.saved_model.load(str(model_dir / 'saved_model' / '4'))
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  batch = next(iter(source.as_dataset(split).take(count).batch(count)))
  images = tf.map_fn(
      lambda image: data_util.preprocess_image(image, 32, 32, False,
                                               test_crop=False),
      batch['image'], fn_output_signature=tf.float32)
  out = loaded(images, trainable=False)
  return (out['final_avg_pool'].numpy(), out['logits_sup'].numpy(),
          batch['label'].numpy())


def test_run_logs_and_reports_knn_accuracy(pretrained_with_monitor,
                                           shapes10_dir):
  model_dir, proc = pretrained_with_monitor
  # Step 2 while training, step 4 in the final evaluation only (once).
  lines = [l for l in proc.stderr.splitlines() if 'kNN monitor at step' in l]
  assert len(lines) == 2, lines
  assert 'step 2: top-1' in lines[0] and 'step 4: top-1' in lines[1]
  assert '100 eval examples vs a bank of 100 train examples' in lines[0]
  result = json.loads((model_dir / 'result.json').read_text())
  assert f"{result['eval/knn_top_1_accuracy']:.4f}" in lines[1]
  # Both accuracies recomputed here from the exported model of step 4 with
  # plain numpy: the first 100 test images (2 eval steps of 50) against the
  # first 100 train images, with the same preprocessing. Features computed
  # in other batches may round differently, which can flip a near tie: one
  # example of 100 is allowed.
  bank, _, bank_labels = exported_outputs(model_dir, shapes10_dir, 'train')
  queries, logits, labels = exported_outputs(model_dir, shapes10_dir, 'test')
  knn = np.mean(reference_predict(reference_scores(
      queries, bank, bank_labels, 10, k=200, temperature=0.1)) == labels)
  assert result['eval/knn_top_1_accuracy'] == pytest.approx(knn, abs=0.011)
  # The linear head trained while pretraining is evaluated too.
  top1 = np.mean(np.argmax(logits, 1) == labels)
  assert result['eval/label_top_1_accuracy'] == pytest.approx(top1,
                                                              abs=0.011)
  tags = {}
  for event_file in model_dir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
      for value in event.summary.value:
        tags.setdefault(value.tag, set()).add(event.step)
  assert tags['eval/knn_top_1_accuracy'] == {2, 4}
  assert tags['eval/label_top_1_accuracy'] == {4}


def test_linear_evaluation_trains_only_the_head(pretrained_with_monitor,
                                                shapes10_dir, tmp_path):
  """README's linear evaluation: finetune with fine_tune_after_block=4."""
  model_dir, _ = pretrained_with_monitor
  run_py(*tiny_run(shapes10_dir, tmp_path), '--train_mode=finetune',
         '--fine_tune_after_block=4', '--zero_init_logits_layer=True',
         '--variable_schema=(?!global_step|(?:.*/|^)Momentum|head)',
         '--global_bn=False', '--optimizer=momentum', '--learning_rate=0.1',
         '--weight_decay=0.0', '--warmup_epochs=0', f'--checkpoint={model_dir}')
  result = json.loads((tmp_path / 'result.json').read_text())
  _, logits, labels = exported_outputs(tmp_path, shapes10_dir, 'test')
  assert result['eval/label_top_1_accuracy'] == pytest.approx(
      np.mean(np.argmax(logits, 1) == labels), abs=0.011)
  assert 'eval/knn_top_1_accuracy' not in result  # monitor off by default
  before = tf.train.load_checkpoint(str(model_dir / 'ckpt-4'))
  after = tf.train.load_checkpoint(str(tmp_path / 'ckpt-4'))
  encoder = [k for k in after.get_variable_to_shape_map()
             if k.startswith('model/resnet_model/') and 'OPTIMIZER' not in k]
  weights = [k for k in encoder if 'moving_' not in k]
  moving = [k for k in encoder if 'moving_mean' in k]
  assert len(weights) > 60 and moving
  for key in weights:  # kernels, gammas, betas: exactly the pretrained ones
    np.testing.assert_array_equal(after.get_tensor(key),
                                  before.get_tensor(key), err_msg=key)
  # As in the original, the frozen encoder's batch norm still updates its
  # moving statistics (README: "Linear evaluation and frozen batch norm").
  assert any(not np.array_equal(after.get_tensor(k), before.get_tensor(k))
             for k in moving)
  head = [k for k in after.get_variable_to_shape_map()
          if 'supervised_head' in k and 'kernel' in k and
          'OPTIMIZER' not in k]
  assert head and np.abs(after.get_tensor(head[0])).max() > 0


def test_random_init_baseline_is_the_runs_own_start(shapes10_dir, tmp_path):
  """--knn_random_init evaluates the encoder the seeded run started from:
  a linear evaluation under the TF1 protocol leaves the encoder as it was
  (weights and batch-norm statistics), so both accuracies are equal;
  pretraining from the same seed starts alike and then differs."""
  import training  # pylint: disable=import-outside-toplevel
  base = Config(
      train_mode='pretrain', dataset='shapes10', data_dir=str(shapes10_dir),
      eval_split='test', resnet_depth=18, width_multiplier=0.25,
      image_size=32, train_batch_size=16, train_steps=2, use_blur=False,
      use_tpu=False, eval_batch_size=100, eval_steps=2,
      knn_monitor_steps=2, knn_bank_size=200, knn_random_init=True, seed=3,
      mode='train_then_eval')
  frozen = training.run(base.replace(
      train_mode='finetune', fine_tune_after_block=4,
      linear_eval_protocol='tf1', model_dir=str(tmp_path / 'frozen')
  ).validate())
  assert (frozen['eval/knn_top_1_accuracy_random_init'] ==
          frozen['eval/knn_top_1_accuracy'])
  trained = training.run(base.replace(
      learning_rate=2.0, model_dir=str(tmp_path / 'trained')).validate())
  assert (trained['eval/knn_top_1_accuracy_random_init'] ==
          frozen['eval/knn_top_1_accuracy_random_init'])
  assert (trained['eval/knn_top_1_accuracy'] !=
          trained['eval/knn_top_1_accuracy_random_init'])
