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


def unpack_original_saved_model(run, target):
  """Extracts fixtures/small/<run>/saved_model.tar.xz (a SavedModel the
  original wrote, in the released format) into `target`; returns its path."""
  import tarfile  # pylint: disable=import-outside-toplevel
  archive = require(FIXTURES / 'small' / run / 'saved_model.tar.xz')
  with tarfile.open(archive) as tar:
    tar.extractall(target, filter='data')
  return pathlib.Path(target) / 'saved_model'


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


# The slowest test files first (test seconds per file on 2 cores, from
# `--durations=0`; 410 s for test_run.py down to 69 s), the rest after in
# name order. With the README's `--dist loadfile --no-loadscope-reorder` the
# two xdist workers take the long files early and finish close together.
SLOW_FILES = (
    'test_run.py', 'test_multiworker.py', 'test_notebooks.py',
    'test_gpu_check.py', 'test_tf1_checkpoints.py', 'test_learning.py',
    'test_speed_options.py', 'test_multiworker_distill.py',
    'test_distributed.py', 'test_released_manifests.py',
    'test_parity_det.py', 'test_distill.py', 'test_knn_monitor.py',
    'test_disk_full.py', 'test_model_dir_lock.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def built_once(tmp_path_factory, name, build):
  """A directory that `build(directory)` fills once per test session.

  With several xdist workers the first to ask builds it where every worker
  of the session sees it (the parent of the workers' base directories),
  under a file lock; the others wait and reuse it.
  """
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    target = tmp_path_factory.mktemp(name)
    build(target)
    return target
  import fcntl  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.getbasetemp().parent
  target, done = root / name, root / f'{name}.done'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(target, ignore_errors=True)
      target.mkdir()
      build(target)
      done.touch()
  return target


@pytest.fixture(scope='session')
def shapes10_dir(tmp_path_factory):
  """A TFDS data dir with the embedded dataset prepared (once per session)."""
  import embedded_dataset  # pylint: disable=import-outside-toplevel
  return built_once(tmp_path_factory, 'tfds',
                    lambda d: embedded_dataset.load_builder(str(d)))


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


# The tiny fine-tuned model the notebook and distillation tests start from:
# ResNet-18 at 1/8 width trained supervised on shapes10 through run.py's
# fine-tuning pipeline (random crop and flip). 200 Adam steps of 64 reach
# 0.67-0.72 test accuracy (chance 0.1) in 30-45 s with the export on 2 busy
# cores; a trained teacher makes the students' agreement meaningful, and
# training on crops keeps its features useful on the crops the fine-tuning
# notebook trains on.
TEACHER_WIDTH = 0.125
TEACHER_STEPS = 200


@pytest.fixture(scope='session')
def tiny_teacher(shapes10_dir, tmp_path_factory):
  """SavedModel dir (released format, 10-class logits_sup) of a small model
  (trained once per session)."""
  return built_once(
      tmp_path_factory, 'teacher',
      lambda d: _train_tiny_teacher(shapes10_dir, d)) / 'saved_model'


def _train_tiny_teacher(shapes10_dir, target):
  import tf_keras as keras  # pylint: disable=import-outside-toplevel
  import config as config_lib  # pylint: disable=import-outside-toplevel
  import data as data_lib  # pylint: disable=import-outside-toplevel
  import export  # pylint: disable=import-outside-toplevel
  import model as model_lib  # pylint: disable=import-outside-toplevel

  cfg = config_lib.Config(resnet_depth=18, width_multiplier=TEACHER_WIDTH,
                          image_size=32, train_mode='finetune',
                          global_bn=False, weight_decay=0.).validate()
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  tf.random.set_seed(0)
  batches = iter(data_lib.build_input_fn(source, 64, True, cfg)())
  model = model_lib.Model(10, cfg)
  model(tf.zeros([1, 32, 32, 3]), training=False)
  optimizer = keras.optimizers.Adam(0.005)

  @tf.function
  def step(images, labels):
    with tf.GradientTape() as tape:
      _, logits = model(images, training=True)
      loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
          labels['labels'], logits))
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(
        [(g, v) for g, v in zip(grads, variables) if g is not None])

  for _ in range(TEACHER_STEPS):
    step(*next(batches))
  export.export_saved_model(model, str(target / 'saved_model'))
