"""Checkpoint layouts of the released model sizes (../shared/fixtures/manifests).

Each model is built in graph mode by a symbolic training-mode call, and its
optimizer's variables (LARS slots, the step counter) are created as a first
`apply_gradients` creates them, without allocating the ~900M parameters of
ResNet-152 3x and, when pretraining (every variable gets a gradient), without
the backward graph (that a real first step checkpoints exactly these keys is
tests/test_parity_det.py's check, against the original's checkpoints).
"""
import pytest
import tensorflow as tf

import conftest
import helpers
import model as model_lib
import training
from config import Config

SIZES = {
    'r50_1x_sk0': dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.),
    'r50_1x_sk0_finetune': dict(resnet_depth=50, width_multiplier=1,
                                sk_ratio=0., train_mode='finetune'),
    'r50_1x_sk1': dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0625),
    'r50_2x_sk1': dict(resnet_depth=50, width_multiplier=2, sk_ratio=0.0625),
    'r101_1x_sk1': dict(resnet_depth=101, width_multiplier=1,
                        sk_ratio=0.0625),
    'r152_3x_sk1': dict(resnet_depth=152, width_multiplier=3,
                        sk_ratio=0.0625),
}


def symbolic_checkpoint_listing(cfg, num_classes=1000):
  """{key: (dtype, shape)} that one training step's checkpoint would hold."""
  with tf.Graph().as_default():
    model = model_lib.Model(num_classes, cfg)
    schedule = model_lib.WarmUpAndCosineDecay(cfg.learning_rate, 1000, cfg)
    optimizer = model_lib.build_optimizer(schedule, cfg)
    channels = 6 if cfg.train_mode == 'pretrain' else 3
    features = tf.compat.v1.placeholder(tf.float32, [1, 64, 64, channels])
    if cfg.train_mode == 'finetune':
      # Only a real step knows which variables get no gradient (the
      # projection head when fine-tuning) and so no slots.
      labels = tf.compat.v1.placeholder(tf.float32, [1, num_classes])
      training.make_train_step(model, optimizer, cfg)(features, labels)
    else:
      model(features, training=True)
      optimizer._create_all_weights(model.trainable_variables)  # pylint: disable=protected-access
    checkpoint = tf.train.Checkpoint(
        model=model, global_step=optimizer.iterations, optimizer=optimizer)
    listing = {k: (v.dtype.base_dtype.name, v.shape.as_list())
               for k, v in helpers.variables_by_key(checkpoint).items()}
  listing['save_counter'] = ('int64', [])  # added by the manager's save()
  return listing


@pytest.mark.parametrize('size', sorted(SIZES))
def test_released_size_checkpoint_layout(size):
  path = conftest.require(conftest.FIXTURES / 'manifests' / f'{size}.txt')
  # Every other flag at the original's default, as the manifests were made.
  cfg = Config(image_size=224, train_batch_size=1, **SIZES[size]).validate()
  expected = {k: (v[0], v[1]) for k, v in helpers.read_manifest(path).items()
              if k != '_CHECKPOINTABLE_OBJECT_GRAPH'}
  assert symbolic_checkpoint_listing(cfg) == expected


def test_released_size_variable_names():
  """Names (which LARS and weight decay match) of a released size."""
  path = conftest.require(
      conftest.FIXTURES / 'manifests' / 'r50_1x_sk1_varnames.txt')
  expected = {}
  for line in open(path):
    key, name = line.rstrip('\n').split('\t')
    expected[key.replace(helpers.SUFFIX, '')] = name
  cfg = Config(image_size=224, train_batch_size=1, sk_ratio=0.0625)
  with tf.Graph().as_default():
    model = model_lib.Model(1000, cfg)
    model(tf.compat.v1.placeholder(tf.float32, [1, 64, 64, 3]),
          training=False)
    names = {k: v.name.split(':')[0] for k, v in
             helpers.variables_by_key(tf.train.Checkpoint(model=model)).items()}
  assert names == {k: v for k, v in expected.items()
                   if k.startswith('model/') and '.OPTIMIZER_SLOT' not in k}
