"""console.py: which log records reach the user's console."""
import logging
import os

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
