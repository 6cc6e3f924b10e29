"""A full disk never leaves a broken latest checkpoint or export: the write
fails with one line (what, where, why, the space it needed), the partial
files are removed and the previous checkpoint stays the latest.

The failure is real, at the file system: a small tmpfs mounted for the test
when the machine allows it (root), otherwise a file size limit
(RLIMIT_FSIZE, "File too large") on the process that writes.
"""
import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
import export
import model as model_lib
import storage
from config import Config


def run_args(shapes10_dir, model_dir, steps):
  return [str(conftest.ROOT / 'run.py'), '--use_tpu=False',
          '--dataset=shapes10', f'--data_dir={shapes10_dir}',
          '--resnet_depth=18', '--width_multiplier=0.25', '--image_size=32',
          '--train_batch_size=8', f'--train_steps={steps}',
          '--checkpoint_steps=2', '--train_summary_steps=0',
          '--keep_checkpoint_max=5', '--use_blur=False', '--mode=train',
          f'--model_dir={model_dir}']


def _mount_tmpfs(path, size):
  if os.geteuid() != 0 or not shutil.which('mount'):
    return False
  path.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}',
                         'tmpfs', str(path)], capture_output=True)
  return done.returncode == 0


def _file_size_limit(limit):
  def preexec():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return preexec


@contextlib.contextmanager
def with_little_space(path, contents, room):
  """A directory holding a copy of `contents` with about `room` bytes more
  (tmpfs), or any room but files limited to `room` bytes; yields (path,
  preexec_fn, how)."""
  used = sum(f.stat().st_size for f in contents.iterdir() if f.is_file())
  mounted = _mount_tmpfs(path, used + room + 64 * 1024)
  if not mounted:
    path.mkdir(exist_ok=True)
  for f in contents.iterdir():
    if f.is_file():
      shutil.copy(f, path)
  try:
    yield (path, None, 'tmpfs') if mounted else (
        path, _file_size_limit(room), 'RLIMIT_FSIZE')
  finally:
    if mounted:
      subprocess.run(['umount', '-l', str(path)], check=False)


def test_full_disk_keeps_the_previous_checkpoint_latest(shapes10_dir,
                                                        tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  first = tmp_path / 'first'
  done = subprocess.run(
      [sys.executable, *run_args(shapes10_dir, first, 2)], cwd=conftest.ROOT,
      env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  data = next(first.glob('ckpt-2.data-*')).stat().st_size
  reader = tf.train.load_checkpoint(str(first / 'ckpt-2'))
  expected = {name: reader.get_tensor(name)
              for name, _ in tf.train.list_variables(str(first / 'ckpt-2'))}

  with with_little_space(tmp_path / 'small', first, data // 2) as (
      model_dir, preexec, how):
    proc = subprocess.run(
        [sys.executable, *run_args(shapes10_dir, model_dir, 4)],
        cwd=conftest.ROOT, env=env, capture_output=True, text=True,
        timeout=300, preexec_fn=preexec)
    print(f'{how}: {proc.stderr.strip().splitlines()[-1]}')
    assert proc.returncode == 2, proc.stderr[-3000:]
    cause = ('no space left on device' if how == 'tmpfs' else
             'file too large for the file system or its size limit')
    line = re.fullmatch(
        rf'error: could not write checkpoint ckpt-4 to {model_dir}: {cause} '
        r'\(needs about ([\d.]+) MB, ([\d.]+) MB free\); the latest '
        r'checkpoint is still ckpt-2: free some space and rerun the same '
        r'command to resume\.', proc.stderr.strip().splitlines()[-1])
    assert line, proc.stderr[-3000:]
    # The space it needed is the checkpoint's size (its data file).
    assert float(line.group(1)) == pytest.approx(data / 2**20, rel=0.05)
    if how == 'tmpfs':
      assert float(line.group(2)) < float(line.group(1))

    # model_dir: ckpt-2 is the latest, whole; nothing of ckpt-4 is left.
    latest = tf.train.latest_checkpoint(str(model_dir))
    assert latest == str(model_dir / 'ckpt-2')
    assert not [p.name for p in model_dir.iterdir() if 'ckpt-4' in p.name]
    reader = tf.train.load_checkpoint(latest)
    for key, value in expected.items():
      np.testing.assert_array_equal(reader.get_tensor(key), value)
    assert not list(model_dir.glob('.run_lock.*'))  # released


def test_full_disk_during_export_keeps_the_earlier_export(tmp_path):
  cfg = Config(resnet_depth=18, width_multiplier=0.25, image_size=32,
               train_mode='pretrain')
  model = model_lib.Model(10, cfg)
  model(tf.zeros([1, 32, 32, 3]), training=False)
  target = tmp_path / 'saved_model' / '7'
  export.export_saved_model(model, str(target))
  before = sorted(p.relative_to(target) for p in target.rglob('*'))
  variables = next(target.glob('variables/variables.data-*')).stat().st_size
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (variables // 2, hard))
  try:
    with pytest.raises(storage.WriteFailed) as error:
      export.export_saved_model(model, str(target))
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  message = str(error.value)
  assert message.startswith(
      f'could not write the SavedModel to {target}: file too large for the '
      'file system or its size limit (needs about '), message
  assert message.endswith('the checkpoints are saved: free some space and '
                          'rerun the same command to export.')
  assert '\n' not in message
  needed = float(re.search(r'needs about ([\d.]+) MB', message).group(1))
  assert needed == pytest.approx(variables / 2**20, rel=0.05)
  assert not (tmp_path / 'saved_model' / '7.tmp').exists()
  assert sorted(p.relative_to(target) for p in target.rglob('*')) == before
  tf.saved_model.load(str(target))  # the earlier export is whole
