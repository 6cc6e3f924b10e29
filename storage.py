"""A write that fails (a full disk or bucket, a file size limit, no
permission) stops the run with one line: what could not be written, where,
why, how much space it needed, and what is still safe on disk.

The writers (checkpoints in runtime.py, SavedModels in export.py) remove
their partial output first, so a full disk never leaves a broken latest
checkpoint or export behind.
"""
import json
import os
import shutil

import tensorflow as tf

# Failures of a collective (a lost worker), not of the write: run.py
# explains those.
_NOT_WRITE_ERRORS = (tf.errors.UnavailableError,
                     tf.errors.DeadlineExceededError,
                     tf.errors.CancelledError, tf.errors.AbortedError)


class WriteFailed(RuntimeError):
  """An output could not be written; the message is one line for the user."""


def is_write_error(error):
  return (isinstance(error, (tf.errors.OpError, OSError)) and
          not isinstance(error, _NOT_WRITE_ERRORS))


def nbytes(variables):
  """Bytes of the values of `variables` (what a checkpoint stores)."""
  return sum(int(v.shape.num_elements()) * v.dtype.size for v in variables)


def free_bytes(path):
  """Free bytes on the local file system holding `path`; None for URLs."""
  if '://' in path:
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _megabytes(count):
  return f'{count / 2**20:.1f} MB'


def _cause(error):
  text = str(error)
  for needle, cause in (('No space left', 'no space left on device'),
                        ('File too large', 'file too large for the file '
                         'system or its size limit'),
                        ('Permission denied', 'permission denied'),
                        ('quota', 'quota exceeded')):
    if needle.lower() in text.lower():
      return cause
  lines = [line for line in text.splitlines() if line.strip()]
  return f'{type(error).__name__}: {(lines or [""])[-1][:160]}'


def write_bytes(path, data):
  """Writes `data` to `path` through a temporary file and a rename, so
  readers see the old file or the new one, never part of one."""
  with tf.io.gfile.GFile(path + '.tmp', 'wb') as f:
    f.write(data)
  tf.io.gfile.rename(path + '.tmp', path, overwrite=True)


def write_json(path, obj):
  """`obj` as JSON, written as `write_bytes` writes."""
  write_bytes(path, json.dumps(obj).encode())


def write_or_stop(path, data, still):
  """`write_bytes` (creating the directory); a failed write removes the
  temporary file, so any earlier file stays, and stops with WriteFailed;
  `still` says what remains safe."""
  try:
    tf.io.gfile.makedirs(os.path.dirname(path))
    write_bytes(path, data)
  except Exception as e:  # pylint: disable=broad-except
    if not is_write_error(e):
      raise
    remove(path + '.tmp')
    raise failed(os.path.basename(path), os.path.dirname(path), e,
                 len(data), still) from None


def remove(path):
  """Removes a file or directory tree if present (partial output)."""
  if tf.io.gfile.isdir(path):
    tf.io.gfile.rmtree(path)
  elif tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


def failed(what, target, error, needed, still):
  """The WriteFailed to raise from `error`: `what` (e.g. 'checkpoint ckpt-4')
  could not be written to `target` and needed about `needed` bytes;
  `still` says what remains safe and how to go on."""
  free = free_bytes(target)
  space = (f'needs about {_megabytes(needed)}, '
           + (f'{_megabytes(free)} free' if free is not None else
              'free space unknown'))
  return WriteFailed(f'could not write {what} to {target}: {_cause(error)} '
                     f'({space}); {still}')
