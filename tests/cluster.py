"""Two-process clusters for the multi-worker tests: launch the workers of one
run.py command on 127.0.0.1 (MultiWorkerMirroredStrategy, CPU), log each to
a file, wait for a condition or a worker's death."""
import json
import os
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

  def start(self, name):
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
          [sys.executable, str(ROOT / 'run.py'), *self.args], cwd=ROOT,
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
