"""Two-process clusters for the multi-worker tests: launch the workers of one
run.py command on 127.0.0.1 (MultiWorkerMirroredStrategy, CPU), log each to
a file, wait for a condition or a worker's death, and the kill-and-restart
scenario both multi-worker test files run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import conftest

ROOT = conftest.ROOT


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


class Cluster:
  """Launches the two workers of one run.py command, logs to files."""

  def __init__(self, tmp, args):
    self.tmp, self.args = tmp, args
    ports = free_ports(2)
    self.cluster = {'worker': [f'127.0.0.1:{p}' for p in ports]}

  def start(self, name, task_args=((), ())):
    """Launches both workers; `task_args[t]` is appended to worker t's
    command (a later flag wins)."""
    procs = []
    for task in range(2):
      tmpdir = self.tmp / f'{name}_tmp{task}'  # where a worker's temp goes
      tmpdir.mkdir()
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='',
                 TMPDIR=str(tmpdir), TF_CONFIG=json.dumps({
                     'cluster': self.cluster,
                     'task': {'type': 'worker', 'index': task}}))
      log = open(self.tmp / f'{name}_worker{task}.log', 'w')
      procs.append(subprocess.Popen(
          [sys.executable, str(ROOT / 'run.py'), *self.args,
           *task_args[task]], cwd=ROOT,
          env=env, stdout=log, stderr=subprocess.STDOUT))
      log.close()
    return procs

  def log(self, name, task):
    return (self.tmp / f'{name}_worker{task}.log').read_text()


def stop_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def wait_for(condition, procs, timeout, what, cluster, name):
  deadline = time.time() + timeout
  while not condition():
    dead = [p.returncode for p in procs if p.poll() is not None]
    assert not dead and time.time() < deadline, (
        f'no {what} after {time.time() - deadline + timeout:.0f} s (exit '
        f'codes {dead}); chief log:\n{cluster.log(name, 0)[-3000:]}')
    time.sleep(0.2)


def kill_and_restart(cluster, model_dir, kill_at='ckpt-2'):
  """Launch 'a' until the chief has saved `kill_at`, SIGKILL worker 1, wait
  for the chief to stop; then launch 'b' (the same command) to the end.

  Returns {'chief_rc', 'chief_exit_s' (after the kill), 'resumed_at' (the
  latest step in model_dir before launch b), 'rcs' (launch b's exit
  codes), 'seconds' (both launches)}.
  """
  import pytest  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  begin = time.time()
  procs = cluster.start('a')
  try:
    wait_for(lambda: (model_dir / f'{kill_at}.index').exists(), procs, 300,
             f'{kill_at} in model_dir', cluster, 'a')
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    try:
      chief_rc = procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
      pytest.fail('the chief still runs 120 s after worker 1 was killed')
    chief_exit_s = time.time() - killed
    procs[1].wait()
  finally:
    stop_all(procs)
  latest = tf.train.latest_checkpoint(str(model_dir))
  resumed_at = int(latest.rsplit('-', 1)[1])
  procs = cluster.start('b')
  try:
    rcs = [p.wait(timeout=400) for p in procs]
  except subprocess.TimeoutExpired:
    pytest.fail('the restarted workers did not finish within 400 s')
  finally:
    stop_all(procs)
  return dict(chief_rc=chief_rc, chief_exit_s=chief_exit_s,
              resumed_at=resumed_at, rcs=rcs, seconds=time.time() - begin)


def assert_both_resumed_and_finished(cluster, model_dir, resumed_at, rcs,
                                     steps):
  """Launch 'b': both workers resumed from model_dir's checkpoint of
  `resumed_at` (none replayed step 1) and finished at `steps`."""
  assert 2 <= resumed_at < steps
  assert rcs == [0, 0], cluster.log('b', 0)[-3000:]
  for task in (0, 1):
    log = cluster.log('b', task)
    assert f'Resuming from {model_dir}/ckpt-{resumed_at}' in log, log[-3000:]
    assert f'step {resumed_at + 1}/{steps} ' in log and ' step 1/' not in log
    assert f'Training complete at step {steps}.' in log
