"""What the user sees: the run's own lines, with library chatter silenced.

Two sources of chatter, each with its own switch back on:
- TensorFlow's native (C++) log lines: the start-up messages (oneDNN, CUDA
  drivers, CPU instructions) and later INFO and WARNING lines (XLA service,
  compiled clusters, rendezvous notes around an error that the run explains
  itself). `hide_native_startup` hides them unless the usual environment
  variable is set: `TF_CPP_MIN_LOG_LEVEL=0 python run.py ...` shows all.
- Python log lines of the libraries (TensorFlow deprecations, TFDS and
  Keras saving notes): `show_run_lines_only` keeps the lines logged by this
  project's modules and every library error; `--library_logs` shows all.

This module must not import TensorFlow: `hide_native_startup` runs before.
"""
import contextlib
import logging
import os
import sys
import tempfile

_PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
_NATIVE_LEVEL = 'TF_CPP_MIN_LOG_LEVEL'
_level_set_here = False


@contextlib.contextmanager
def _stderr_captured():
  """Sends file descriptor 2 (native code writes there) to a temporary file;
  replays it if the block fails, so a broken installation still says why."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      captured.seek(0)
      os.write(2, captured.read())
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def hide_native_startup():
  """Imports TensorFlow and finds its devices with native INFO lines hidden.

  The start-up lines are written before TensorFlow reads its log level, so
  they are captured at the file descriptor; later native lines follow
  TF_CPP_MIN_LOG_LEVEL, set here to 2 (errors only) unless the user set it,
  which also turns the capture off.
  """
  global _level_set_here
  if _NATIVE_LEVEL in os.environ:
    return
  os.environ[_NATIVE_LEVEL] = '2'
  _level_set_here = True
  with _stderr_captured():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.list_physical_devices()


def user_environment():
  """This process's environment without the level `hide_native_startup`
  set: what a child run.py gets, so it hides its own start-up lines (and
  keeps a level the user set)."""
  env = dict(os.environ)
  if _level_set_here:
    env.pop(_NATIVE_LEVEL, None)
  return env


class _RunLinesOnly(logging.Filter):
  """Passes the records of this project's modules and every error.

  The modules are the files at the top of the project (a virtual
  environment inside it holds the libraries further down).
  """

  def filter(self, record):
    return (record.levelno >= logging.ERROR or
            os.path.dirname(os.path.abspath(record.pathname)) == _PROJECT_DIR)


def show_run_lines_only(library_logs=False):
  """Silences the libraries' Python log lines below ERROR, unless
  `library_logs`. Call after absl has installed its handler (in main)."""
  if library_logs:
    return
  logging.getLogger('tensorflow').setLevel(logging.ERROR)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_RunLinesOnly())
