"""Real checkpoints written by the original (../shared/fixtures/small) restore
into this project's model with every key matched and reproduce the outputs
the original's SavedModel gave on the same images."""
import json

import numpy as np
import pytest
import tensorflow as tf

import conftest
import helpers
import model as model_lib

RUNS = {'r18_w0125': 'ckpt-3', 'r50_sk1_w00625': 'ckpt-2'}
NAMES = ('initial_conv', 'initial_max_pool', 'block_group1', 'block_group2',
         'block_group3', 'block_group4', 'final_avg_pool', 'proj_head_input',
         'proj_head_output', 'logits_sup')


class Restored:

  def __init__(self, run):
    folder = conftest.require(conftest.FIXTURES / 'small' / run)
    flags = json.loads((folder / 'flags.json').read_text())
    self.config = helpers.config_from_flags(flags).validate()
    self.images = tf.constant(np.load(folder / 'inputs.npz')['images'])
    self.outputs = np.load(folder / 'outputs.npz')
    self.model = model_lib.Model(10, self.config)
    self.model.endpoints(self.images, training=False)  # create variables
    schedule = model_lib.WarmUpAndCosineDecay(self.config.learning_rate, 32,
                                              self.config)
    self.optimizer = model_lib.build_optimizer(schedule, self.config)
    # Slots exist before the restore, so every saved slot has a home.
    self.optimizer._create_all_weights(self.model.trainable_variables)  # pylint: disable=protected-access
    self.checkpoint = tf.train.Checkpoint(
        model=self.model, global_step=self.optimizer.iterations,
        optimizer=self.optimizer)
    self.prefix = str(folder / 'ckpt' / RUNS[run])

  def restore(self):
    return self.checkpoint.restore(self.prefix)


@pytest.fixture(scope='module', params=sorted(RUNS))
def restored(request):
  return Restored(request.param)


def test_every_key_matched_both_ways(restored):
  status = restored.restore()
  status.assert_consumed()  # every saved value found a variable...
  status.assert_existing_objects_matched()  # ...and every variable a value
  saved = helpers.checkpoint_listing(restored.prefix)
  ours = helpers.variables_by_key(restored.checkpoint)
  assert set(saved) == set(ours)
  # The training step the checkpoint was written at (ckpt-N).
  assert int(restored.optimizer.iterations) == int(restored.prefix[-1])


def test_inference_outputs_match_original_savedmodel(restored):
  restored.restore().assert_consumed()
  outputs = restored.model.endpoints(restored.images, training=False)
  assert sorted(outputs) == sorted(NAMES)
  for name in NAMES:
    diff = helpers.max_rel_diff(outputs[name].numpy(),
                                restored.outputs[f'savedmodel/{name}'])
    assert diff < 1e-4, (name, diff)
  proj_out, logits = restored.model(restored.images, training=False)
  assert helpers.max_rel_diff(
      proj_out.numpy(), restored.outputs['keras/proj_head_output']) < 1e-4
  assert helpers.max_rel_diff(
      logits.numpy(), restored.outputs['keras/logits_sup']) < 1e-4


def test_batch_statistics_outputs_match_original_savedmodel(restored):
  restored.restore().assert_consumed()
  outputs = restored.model.endpoints(restored.images, training=True)
  keys = [k for k in restored.outputs.files
          if k.startswith('savedmodel_trainable/')]
  assert keys
  for key in keys:
    name = key.split('/', 1)[1]
    # Batch-statistics BN in float32: the original's own rounding reaches
    # ~1e-4 of the output's scale here (fixture README).
    diff = helpers.max_rel_diff(outputs[name].numpy(), restored.outputs[key])
    assert diff < 1e-3, (name, diff)
