"""What the benchmarks share: the machine's description, a timer, peak
memory. No flags here (each bench defines its own)."""
import os
import platform
import resource
import time

import tensorflow as tf


def machine():
  gpus = tf.config.list_physical_devices('GPU')
  return {'cpu_count': os.cpu_count(), 'platform': platform.platform(),
          'processor': platform.processor(), 'gpus': len(gpus),
          'tensorflow': tf.__version__}


def timed(fn, seconds):
  """Calls per second of `fn` (which returns a tensor) over `seconds`."""
  fn().numpy()  # warm-up (tracing, first allocations)
  fn().numpy()
  calls, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or calls < 3:
    result = fn()
    calls += 1
    if calls % 5 == 0:
      result.numpy()  # keep the host from running far ahead
  result.numpy()
  return calls / (time.perf_counter() - start)


def peak_memory():
  # ru_maxrss is in KiB on Linux.
  memory = {'peak_rss_mb': round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
  if tf.config.list_physical_devices('GPU'):
    memory['peak_gpu_mb'] = round(
        tf.config.experimental.get_memory_info('GPU:0')['peak'] / 2**20, 1)
  return memory
