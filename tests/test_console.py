"""console.py: which log records reach the user's console."""
import logging
import os
import re
import subprocess
import sys

from absl import logging as absl_logging

import conftest
import console


def record(path, level=logging.INFO):
  return logging.LogRecord('absl', level, str(path), 1, 'a line', None, None)


def test_run_lines_pass_and_library_lines_below_error_do_not():
  keep = console._RunLinesOnly().filter  # pylint: disable=protected-access
  root = conftest.ROOT
  assert keep(record(root / 'runtime.py'))
  assert keep(record(root / 'model_dir_lock.py', logging.WARNING))
  # Libraries, also from a virtual environment inside the project (as CI
  # makes one), and anywhere else.
  inside = root / '.venv' / 'lib' / 'python3.11' / 'site-packages'
  for library in (inside / 'tensorflow_datasets' / 'core' / 'reader.py',
                  os.path.join(os.sep, 'usr', 'lib', 'tf_keras', 'save.py')):
    assert not keep(record(library))
    assert not keep(record(library, logging.WARNING))
    assert keep(record(library, logging.ERROR))


def test_library_logs_keeps_every_python_line():
  tf_logger = logging.getLogger('tensorflow')
  level = tf_logger.level
  handler = absl_logging.get_absl_handler()
  filters = list(handler.filters)
  try:
    tf_logger.setLevel(logging.INFO)
    console.show_run_lines_only(library_logs=True)
    assert handler.filters == filters
    assert tf_logger.level == logging.INFO
    console.show_run_lines_only()
    assert tf_logger.level == logging.ERROR
    added = [f for f in handler.filters if f not in filters]
    library = os.path.join(os.sep, 'usr', 'lib', 'tf_keras', 'save.py')
    assert len(added) == 1 and not added[0].filter(record(library))
  finally:
    handler.filters[:] = filters
    tf_logger.setLevel(level)


NATIVE_LINE = re.compile(r'^[IWEF]\d{4} ', re.MULTILINE)  # glog's prefix


def start_as_run_py(env_extra):
  """A process that starts as run.py does (console.hide_native_startup, then
  TensorFlow works): TensorFlow's native lines on its stderr, and the level
  its child run.py would get (console.user_environment)."""
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  env.update(env_extra)
  code = ('import console; console.hide_native_startup(); '
          'import tensorflow as tf; print(float(tf.reduce_sum(tf.ones(3)))); '
          "print(console.user_environment().get('TF_CPP_MIN_LOG_LEVEL'))")
  proc = subprocess.run([sys.executable, '-c', code], cwd=conftest.ROOT,
                        env=env, capture_output=True, text=True, check=True)
  total, child_level = proc.stdout.split()
  assert total == '3.0'
  return NATIVE_LINE.findall(proc.stderr), child_level


def test_native_lines_are_hidden_unless_the_user_sets_the_level():
  lines, child_level = start_as_run_py({})
  assert not lines
  assert child_level == 'None'  # the child hides its own start-up lines
  # oneDNN's start-up note (and on a GPU-less machine with CUDA libraries,
  # cuInit's): what the usual variable brings back.
  lines, child_level = start_as_run_py({'TF_CPP_MIN_LOG_LEVEL': '0'})
  assert lines
  assert child_level == '0'
