"""One training run per model_dir: a lock that works on local disks and gs://.

A second run started on a model_dir in use (a resubmitted job) would write
checkpoints over the first one's. `held(model_dir)` stops it at once with
one line naming the run that holds it (host, pid, start time).

How, without an atomic create-if-absent (which gs:// lacks through
tf.io.gfile): every run writes its own claim file `.run_lock.<id>.json`,
then lists the claims. The live claim that started first holds the lock;
the others remove theirs and stop. Two runs starting together both see
both claims and agree on the winner. A claim is stale, and is removed with
a warning, when its process is gone (same host, pid not running) or its
heartbeat (rewritten every `heartbeat_s` by a thread) is older than
`stale_s`: a run killed by SIGKILL or a lost machine leaves one behind.
"""
import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
import tensorflow as tf

import config as config_lib
import storage

PREFIX = '.run_lock.'
HEARTBEAT_S = 60.0
STALE_S = 600.0


class ModelDirInUse(config_lib.ConfigError):
  """Another live run holds model_dir; the message is one line."""


def _process_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def _read(path):
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.loads(f.read())
  except (tf.errors.NotFoundError, ValueError):
    return None  # released meanwhile, or being rewritten


def _claims(model_dir):
  pattern = os.path.join(model_dir, PREFIX + '*.json')
  return {path: _read(path) for path in tf.io.gfile.glob(pattern)}


def _stale_reason(claim, now, stale_s):
  if claim['host'] == socket.gethostname() and not _process_alive(
      claim['pid']):
    return 'its process is gone'
  if now - claim['heartbeat'] > stale_s:
    return f'no heartbeat for {now - claim["heartbeat"]:.0f} s'
  return None


def describe(claim):
  started = datetime.datetime.fromtimestamp(claim['start']).isoformat(
      sep=' ', timespec='seconds')
  return f'host {claim["host"]}, pid {claim["pid"]}, started {started}'


def _acquire(model_dir, stale_s):
  now = time.time()
  mine = {'host': socket.gethostname(), 'pid': os.getpid(), 'start': now,
          'heartbeat': now, 'id': uuid.uuid4().hex}
  path = os.path.join(model_dir, f'{PREFIX}{mine["id"]}.json')
  storage.write_json(path, mine)
  holders = []
  for other_path, claim in _claims(model_dir).items():
    if other_path == path or claim is None:
      continue
    reason = _stale_reason(claim, time.time(), stale_s)
    if reason:
      logging.warning('Taking over the lock of --model_dir=%s from an '
                      'earlier run (%s): %s.', model_dir, describe(claim),
                      reason)
      with contextlib.suppress(tf.errors.NotFoundError):
        tf.io.gfile.remove(other_path)
    else:
      holders.append(claim)
  first = min(holders + [mine], key=lambda c: (c['start'], c['id']))
  if first is not mine:
    tf.io.gfile.remove(path)
    raise ModelDirInUse(
        f'--model_dir={model_dir} is in use by another run ({describe(first)})'
        '; wait for it to finish or stop it, or choose another --model_dir '
        f'(a run that is gone is taken over after {stale_s:.0f} s without a '
        'heartbeat, or at once on its own host).')
  return path, mine


@contextlib.contextmanager
def held(model_dir, heartbeat_s=HEARTBEAT_S, stale_s=STALE_S):
  """Holds model_dir for this run (ModelDirInUse if another holds it)."""
  path, mine = _acquire(model_dir, stale_s)
  done = threading.Event()

  def beat():
    while not done.wait(heartbeat_s):
      mine['heartbeat'] = time.time()
      with contextlib.suppress(tf.errors.OpError, OSError):
        storage.write_json(path, mine)  # a missed beat is retried at the next

  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    yield mine
  finally:
    done.set()
    thread.join()
    with contextlib.suppress(tf.errors.OpError, OSError):
      tf.io.gfile.remove(path)
