"""One run per model_dir: a second run stops at once naming the first; a
stale lock (its process gone, or no heartbeat) is taken over with a warning.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import conftest
import model_dir_lock


def claims(model_dir):
  return sorted(p.name for p in model_dir.glob(model_dir_lock.PREFIX + '*'))


def write_claim(model_dir, host, pid, start, heartbeat, name='other'):
  path = model_dir / f'{model_dir_lock.PREFIX}{name}.json'
  path.write_text(json.dumps({'host': host, 'pid': pid, 'start': start,
                              'heartbeat': heartbeat, 'id': name}))
  return path


def test_held_writes_a_claim_and_removes_it(tmp_path):
  with model_dir_lock.held(str(tmp_path)) as mine:
    assert len(claims(tmp_path)) == 1
    assert (mine['host'], mine['pid']) == (socket.gethostname(), os.getpid())
    # A second holder in the same process is another run: refused.
    with pytest.raises(model_dir_lock.ModelDirInUse) as error:
      with model_dir_lock.held(str(tmp_path)):
        pass
    assert f'pid {os.getpid()}' in str(error.value)
    assert '\n' not in str(error.value)
    assert len(claims(tmp_path)) == 1  # the loser removed its claim
  assert claims(tmp_path) == []


def test_live_run_on_another_host_keeps_the_lock(tmp_path):
  now = time.time()
  write_claim(tmp_path, 'elsewhere', 4321, start=now - 50, heartbeat=now - 5)
  with pytest.raises(model_dir_lock.ModelDirInUse) as error:
    with model_dir_lock.held(str(tmp_path)):
      pass
  assert 'in use by another run (host elsewhere, pid 4321, started ' in str(
      error.value)
  assert claims(tmp_path) == [f'{model_dir_lock.PREFIX}other.json']


def test_later_claim_of_a_concurrent_start_loses(tmp_path):
  """Two runs starting together: the one that started first holds it."""
  now = time.time()
  write_claim(tmp_path, 'elsewhere', 4321, start=now + 60, heartbeat=now)
  with model_dir_lock.held(str(tmp_path)):
    pass  # ours started first; the other run, listing, would stop


def test_stale_claims_are_taken_over(tmp_path, caplog):
  now = time.time()
  write_claim(tmp_path, 'elsewhere', 4321, start=now - 5000,
              heartbeat=now - model_dir_lock.STALE_S - 1, name='silent')
  gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  write_claim(tmp_path, socket.gethostname(), int(gone.stdout), start=now - 10,
              heartbeat=now, name='gone')
  with caplog.at_level('WARNING'):
    with model_dir_lock.held(str(tmp_path)):
      assert len(claims(tmp_path)) == 1
  messages = ' '.join(r.getMessage() for r in caplog.records)
  assert 'host elsewhere, pid 4321' in messages and 'no heartbeat for' in messages
  assert f'pid {gone.stdout.strip()}' in messages
  assert 'its process is gone' in messages
  assert claims(tmp_path) == []


def test_heartbeat_keeps_the_claim_fresh(tmp_path):
  with model_dir_lock.held(str(tmp_path), heartbeat_s=0.1) as mine:
    first = mine['heartbeat']
    time.sleep(0.5)
    path = tmp_path / claims(tmp_path)[0]
    on_disk = json.loads(path.read_text())
  assert on_disk['heartbeat'] > first
  # With the heartbeat stopped, the claim goes stale for another host.
  assert model_dir_lock._stale_reason(  # pylint: disable=protected-access
      dict(on_disk, host='elsewhere'), on_disk['heartbeat'] + 11, 10)


def run_args(shapes10_dir, model_dir, steps):
  return [str(conftest.ROOT / 'run.py'), '--use_tpu=False',
          '--dataset=shapes10', f'--data_dir={shapes10_dir}',
          '--resnet_depth=18', '--width_multiplier=0.25', '--image_size=32',
          '--train_batch_size=8', f'--train_steps={steps}',
          '--checkpoint_steps=2', '--use_blur=False', '--mode=train',
          f'--model_dir={model_dir}']


def test_second_run_on_a_model_dir_in_use_stops_at_once(shapes10_dir,
                                                        tmp_path):
  """Two processes; a killed run's claim taken over by the next run is
  tested in test_run.py::test_killed_run_resumes_from_its_last_checkpoint."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  first = subprocess.Popen(
      [sys.executable, *run_args(shapes10_dir, tmp_path, 100000)],
      cwd=conftest.ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not (tmp_path / 'ckpt-2.index').exists():
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.2)
    second = subprocess.run(
        [sys.executable, *run_args(shapes10_dir, tmp_path, 100000)],
        cwd=conftest.ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: --model_dir={tmp_path} is in use by '
                           f'another run (host {socket.gethostname()}, pid '
                           f'{first.pid}, started '), last
    assert 'train input pipeline' not in second.stderr  # no work done
    assert first.poll() is None
    assert len(claims(tmp_path)) == 1  # the first run's
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
  assert first.returncode == 0 and claims(tmp_path) == []
