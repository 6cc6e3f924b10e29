"""Shared test set-up: import path, two logical CPUs, reference-data paths."""
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('SIMCLR_SHARED', ROOT.parent / 'shared'))
FIXTURES_DET = SHARED / 'fixtures_det'
FIXTURES = SHARED / 'fixtures'

sys.path.insert(0, str(ROOT))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

# Two logical CPU devices, so MirroredStrategy tests have two replicas. Must
# happen before TensorFlow initialises its devices.
_cpus = tf.config.list_physical_devices('CPU')
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


def require(path):
  """Skips the calling test, naming the path, when reference data is absent."""
  if not pathlib.Path(path).exists():
    pytest.skip(f'reference data not found: {path} (set SIMCLR_SHARED)')
  return pathlib.Path(path)


@pytest.fixture(scope='session')
def mirrored2():
  """One MirroredStrategy over the two logical CPUs for the whole session.

  One instance only: collective-op keys restart with every new strategy on
  the same devices, and two strategies' collectives would then collide.
  """
  devices = [d.name for d in tf.config.list_logical_devices('CPU')][:2]
  assert len(devices) == 2
  return tf.distribute.MirroredStrategy(devices)


@pytest.fixture(scope='session')
def shapes10_dir(tmp_path_factory):
  """A TFDS data dir with the embedded dataset prepared (once per session)."""
  import embedded_dataset  # pylint: disable=import-outside-toplevel
  data_dir = tmp_path_factory.mktemp('tfds')
  embedded_dataset.load_builder(str(data_dir))
  return data_dir


@pytest.fixture(scope='session')
def det():
  """numerics.npz of fixtures_det (loss, LARS, schedule, BN, preprocessing)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return np.load(require(FIXTURES_DET / 'numerics.npz'))


@pytest.fixture(scope='session')
def ref():
  """numerics.npz of fixtures (NT-Xent, LARS, schedule, data)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return np.load(require(FIXTURES / 'numerics.npz'))
