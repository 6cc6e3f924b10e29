"""training.evaluate's top-1/top-5 equal values computed by hand from the model's
logits on every example of the split, once each, on one and two replicas
(the last batches padded with masked examples)."""
import json

import numpy as np
import pytest
import tensorflow as tf

import data as data_lib
import data_util
import model as model_lib
import training
from config import Config

# 1000 test examples in batches of 48: 21 steps on one replica, the last
# one 40 examples short; 2 replicas of 24 pad the same way.
CFG = dict(resnet_depth=18, width_multiplier=0.125, image_size=32,
           train_mode='finetune', eval_batch_size=48, eval_split='test',
           dataset='shapes10', keep_hub_module_max=2)


def hand_accuracies(model, source):
  """(top-1, top-5) over the whole test split with numpy: an example is in
  the top 5 when fewer than 5 classes score strictly higher than its label
  (tf.math.in_top_k's rule for ties at the boundary)."""
  hits1, hits5 = [], []
  for batch in source.as_dataset('test').batch(100):
    images = tf.map_fn(
        lambda image: data_util.preprocess_image(image, 32, 32, False,
                                                 test_crop=False),
        batch['image'], fn_output_signature=tf.float32)
    _, logits = model(images, training=False)
    logits, labels = logits.numpy(), batch['label'].numpy()
    own = logits[np.arange(len(labels)), labels]
    higher = (logits > own[:, None]).sum(1)
    hits1.append(np.argmax(logits, 1) == labels)
    hits5.append(higher < 5)
  hits1, hits5 = np.concatenate(hits1), np.concatenate(hits5)
  assert len(hits1) == 1000
  return hits1.mean(), hits5.mean()


@pytest.mark.parametrize('replicas', [1, 2])
def test_top1_top5_equal_hand_computed(replicas, shapes10_dir, mirrored2,
                                       tmp_path):
  strategy = mirrored2 if replicas == 2 else tf.distribute.get_strategy()
  cfg = Config(data_dir=str(shapes10_dir), model_dir=str(tmp_path),
               **CFG).validate()
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  tf.random.set_seed(3)
  with strategy.scope():
    model = model_lib.Model(10, cfg)
    model(tf.zeros([1, 32, 32, 3]), training=False)
    # A classifier with large random weights, so that predictions spread
    # over the classes and top-5 differs from top-1.
    for variable in model.supervised_head.trainable_weights:
      variable.assign(tf.random.normal(variable.shape, stddev=3.))
  saved = tf.train.Checkpoint(
      model=model, global_step=tf.Variable(7, dtype=tf.int64)).save(
          str(tmp_path / 'ckpt'))
  # Earlier exports: --keep_hub_module_max=2 keeps the newest two (with the
  # one this evaluation writes) and leaves what is not a step alone.
  for name in ('3', '5', 'notes'):
    (tmp_path / 'saved_model' / name).mkdir(parents=True)
  result = training.evaluate(cfg, source, strategy, model, saved, 1000,
                        str(tmp_path))
  top1, top5 = hand_accuracies(model, source)
  assert 0 < top1 < top5 < 1  # neither trivially 0 nor 1
  assert result['eval/label_top_1_accuracy'] == pytest.approx(top1, abs=1e-6)
  assert result['eval/label_top_5_accuracy'] == pytest.approx(top5, abs=1e-6)
  assert result['global_step'] == 7
  written = json.loads((tmp_path / 'result.json').read_text())
  assert written == json.loads((tmp_path / 'result_7.json').read_text())
  assert written['eval/label_top_1_accuracy'] == pytest.approx(top1,
                                                               abs=1e-6)
  assert (tmp_path / 'saved_model' / '7' / 'saved_model.pb').exists()
  assert sorted(p.name for p in (tmp_path / 'saved_model').iterdir()) == [
      '5', '7', 'notes']
