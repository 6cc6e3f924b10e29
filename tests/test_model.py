"""Model behaviour beyond the fixtures: depths, stems, head modes, freezing,
zero-initialised classifier, and configuration errors."""
import numpy as np
import pytest
import tensorflow as tf

import helpers
import model as model_lib
import resnet
import training
from config import Config, ConfigError

TINY = dict(resnet_depth=18, width_multiplier=0.125, image_size=32, train_batch_size=4,
            proj_out_dim=16, use_blur=False)


def build(num_classes=5, **overrides):
  cfg = Config(**{**TINY, **overrides}).validate()
  model = model_lib.Model(num_classes, cfg)
  model(tf.zeros([2, cfg.image_size, cfg.image_size, 3]), training=False)
  return cfg, model


def one_step(cfg, model, num_classes=5):
  optimizer = model_lib.build_optimizer(0.1, cfg)
  views = 2 if cfg.train_mode == 'pretrain' else 1
  features = tf.random.stateless_uniform(
      [4, cfg.image_size, cfg.image_size, 3 * views], seed=[0, 1])
  labels = tf.one_hot([0, 1, 2, 3], num_classes)
  before = {v.name: v.numpy() for v in model.trainable_variables}
  terms = training.make_train_step(model, optimizer, cfg)(features, labels)
  moved = {v.name: not np.array_equal(before[v.name], v.numpy())
           for v in model.trainable_variables}
  return terms, moved


@pytest.mark.parametrize('depth', [18, 34, 50, 101, 152, 200])
def test_depths_have_the_paper_block_counts_and_endpoints(depth):
  cfg = Config(resnet_depth=depth, width_multiplier=0.0625, image_size=64)
  encoder = resnet.resnet(cfg)
  hiddens, endpoints = encoder(tf.zeros([1, 64, 64, 3]), training=False,
                               return_endpoints=True)
  _, blocks = resnet.BLOCKS_PER_GROUP[depth]
  assert [len(g.layers) for g in encoder.block_groups] == list(blocks)
  expansion = 4 if depth >= 50 else 1
  assert hiddens.shape == [1, 512 * expansion // 16]
  assert endpoints['initial_max_pool'].shape == [1, 16, 16, 4]
  for g, (size, channels) in enumerate(((16, 4), (8, 8), (4, 16), (2, 32))):
    assert endpoints[f'block_group{g + 1}'].shape == [
        1, size, size, channels * expansion]
  assert set(endpoints) == set(resnet.ENDPOINTS)


def test_cifar_stem_only_up_to_32_pixels():
  small = resnet.resnet(Config(resnet_depth=18, width_multiplier=0.125,
                               image_size=32))
  _, ends = small(tf.zeros([1, 32, 32, 3]), False, return_endpoints=True)
  assert ends['initial_max_pool'].shape == [1, 32, 32, 8]
  big = resnet.resnet(Config(resnet_depth=18, width_multiplier=0.125,
                             image_size=33))
  _, ends = big(tf.zeros([1, 33, 33, 3]), False, return_endpoints=True)
  assert ends['initial_conv'].shape == [1, 17, 17, 8]
  assert ends['initial_max_pool'].shape == [1, 9, 9, 8]


def test_local_batch_norm_when_not_global():
  _, model = build(global_bn=False)
  names = [v.name for v in model.variables if 'moving_mean' in v.name]
  assert names and all('/batch_normalization' in n for n in names)
  _, model = build(global_bn=True)
  names = [v.name for v in model.variables if 'moving_mean' in v.name]
  assert all('sync_batch_normalization' in n for n in names)


def test_linear_projection_head_pretrains():
  cfg, model = build(proj_head_mode='linear', train_mode='pretrain')
  keys = helpers.variables_by_key(tf.train.Checkpoint(model=model))
  head = sorted(k for k in keys if '_projection_head' in k)
  assert head == [f'model/_projection_head/linear_layers/0/{s}' for s in (
      'bn_relu/bn/gamma', 'bn_relu/bn/moving_mean',
      'bn_relu/bn/moving_variance', 'dense/kernel')]
  terms, moved = one_step(cfg, model)
  assert np.isfinite(float(terms['contrast_loss']))
  head = [n for n in moved if '/l_0/' in n]
  assert len(head) == 2 and all(moved[n] for n in head)


def test_no_projection_head_finetunes_on_the_representation():
  cfg, model = build(proj_head_mode='none', train_mode='finetune')
  assert not model._projection_head.trainable_weights  # pylint: disable=protected-access
  proj_out, logits = model(tf.zeros([3, 32, 32, 3]), training=False)
  assert proj_out is None and logits.shape == [3, 5]
  kernel = model.supervised_head.linear_layer.dense.kernel
  assert kernel.shape == [64, 5]
  terms, moved = one_step(cfg, model)
  assert 'contrast_loss' not in terms
  assert moved[kernel.name]
  assert sum(moved.values()) > len(moved) // 2


@pytest.mark.parametrize('selector,width', [(0, 64), (1, 64), (-1, 16),
                                            (3, 16)])
def test_ft_proj_selector_picks_the_supervised_input(selector, width):
  _, model = build(train_mode='finetune', ft_proj_selector=selector)
  assert model.supervised_head.linear_layer.dense.kernel.shape == [width, 5]


def test_zero_init_logits_layer_zeroes_the_classifier():
  _, model = build(train_mode='finetune', zero_init_logits_layer=True)
  weights = model.supervised_head.trainable_weights
  assert len(weights) == 2 and all(not np.any(w.numpy()) for w in weights)
  for w in weights:  # e.g. restored from a checkpoint with a trained head
    w.assign(tf.ones_like(w))
  model.zero_supervised_head()
  assert all(not np.any(w.numpy()) for w in weights)
  _, default = build(train_mode='finetune')
  assert np.any(default.supervised_head.linear_layer.dense.kernel.numpy())


@pytest.mark.parametrize('block', [-1, 0, 1, 2, 3, 4])
def test_fine_tune_after_block_freezes_the_stem_and_groups(block):
  cfg, model = build(train_mode='finetune', fine_tune_after_block=block)
  keys = helpers.variables_by_key(tf.train.Checkpoint(model=model))
  trainable = {id(v) for v in model.trainable_variables}
  frozen_prefixes = []
  if block >= 0:
    frozen_prefixes.append('model/resnet_model/initial_conv_relu_max_pool/')
  frozen_prefixes += [f'model/resnet_model/block_groups/{g}/'
                      for g in range(block)]
  for key, variable in keys.items():
    if 'moving_' in key:
      continue
    assert (id(variable) in trainable) != key.startswith(
        tuple(frozen_prefixes)), key
  # Gradients never reach the frozen part, and the step moves the rest.
  _, moved = one_step(cfg, model)
  assert any(moved.values())


def test_frozen_batch_norm_still_updates_moving_statistics():
  """The original's linear-eval behaviour, kept and documented."""
  cfg, model = build(train_mode='finetune', fine_tune_after_block=4)
  stem_bn = model.resnet_model.initial_conv_relu_max_pool[2].bn
  before = stem_bn.moving_mean.numpy()
  one_step(cfg, model)
  assert not np.array_equal(before, stem_bn.moving_mean.numpy())


def test_pretraining_refuses_frozen_layers_and_blurs_when_asked():
  # A model checks its (unvalidated) Config.
  with pytest.raises(ValueError, match='fine_tune_after_block'):
    model_lib.Model(5, Config(**{**TINY, 'train_mode': 'pretrain',
                                 'fine_tune_after_block': 2}))
  _, blurred = build(train_mode='pretrain', use_blur=True)
  proj_out, logits = blurred(tf.random.uniform([2, 32, 32, 6]), training=True)
  assert proj_out.shape == [4, 16] and logits.shape == [4, 5]


@pytest.mark.parametrize('overrides,names', [
    (dict(train_mode='pretrain', proj_head_mode='none'), 'proj_head_mode'),
    (dict(train_mode='pretrain', fine_tune_after_block=2), 'fine_tune_after_block'),
    (dict(train_mode='finetune', fine_tune_after_block=5), 'fine_tune_after_block'),
    (dict(ft_proj_selector=4), 'ft_proj_selector'),
    (dict(proj_head_mode='linear', ft_proj_selector=2), 'ft_proj_selector'),
    (dict(resnet_depth=42), 'resnet_depth'),
    (dict(width_multiplier=0.01), 'width_multiplier'),
    (dict(optimizer='sgd'), 'optimizer'),
    (dict(learning_rate_scaling='log'), 'learning_rate_scaling'),
    (dict(train_mode='train'), 'train_mode'),
    (dict(mode='predict'), 'mode'),
    (dict(proj_head_mode='deep'), 'proj_head_mode'),
    (dict(temperature=0.), 'temperature'),
    (dict(batch_norm_decay=1.0), 'batch_norm_decay'),
    (dict(train_batch_size=0), 'train_batch_size'),
    (dict(sk_ratio=-0.1), 'sk_ratio'),
])
def test_bad_config_gives_one_line_naming_the_value(overrides, names):
  with pytest.raises(ConfigError) as error:
    Config(**overrides).validate()
  message = str(error.value)
  assert names in message and '\n' not in message


def test_weight_decay_terms_follow_the_optimizer():
  cfg, model = build(train_mode='finetune', weight_decay=1e-2)
  lars = model_lib.add_weight_decay(model, cfg.replace(optimizer='lars'))
  kernel = model.supervised_head.linear_layer.dense.kernel
  np.testing.assert_allclose(float(lars),
                             1e-2 * np.square(kernel.numpy()).sum() / 2,
                             rtol=1e-5)
  momentum = model_lib.add_weight_decay(model, cfg.replace(optimizer='momentum'))
  expected = sum(np.square(v.numpy()).sum() / 2
                 for v in model.trainable_weights
                 if 'batch_normalization' not in v.name)
  np.testing.assert_allclose(float(momentum), 1e-2 * expected, rtol=1e-5)
