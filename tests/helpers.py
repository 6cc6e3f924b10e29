"""Helpers shared by the parity tests: configs, manifests, checkpoint keys."""
import json

import numpy as np
import tensorflow as tf

from checkpoints import SUFFIX, variables_by_key  # pylint: disable=unused-import
import config as config_lib


def config_from_flags(flags, **overrides):
  """A Config from a dict of the original's flag values (extra keys ignored)."""
  fields = config_lib.Config.__dataclass_fields__
  values = {k: v for k, v in flags.items() if k in fields}
  values.update(overrides)
  return config_lib.Config(**values)


def read_manifest(path):
  """{key: (dtype, shape, *rest)} from a tab-separated manifest file."""
  entries = {}
  for line in open(path):
    if line.startswith('#') or not line.strip():
      continue
    key, dtype, shape, *rest = line.rstrip('\n').split('\t')
    if key.endswith(SUFFIX):
      key = key[:-len(SUFFIX)]
    entries[key] = (dtype, json.loads(shape), *rest)
  return entries


def checkpoint_listing(prefix):
  """{key: (dtype, shape)} of a saved checkpoint, suffixes stripped."""
  reader = tf.train.load_checkpoint(prefix)
  dtypes = reader.get_variable_to_dtype_map()
  shapes = reader.get_variable_to_shape_map()
  listing = {}
  for key, shape in shapes.items():
    if key == '_CHECKPOINTABLE_OBJECT_GRAPH':
      continue
    name = key[:-len(SUFFIX)] if key.endswith(SUFFIX) else key
    listing[name] = (dtypes[key].name, list(shape))
  return listing


def max_rel_diff(actual, expected):
  """max |a - e| / max(1, max |e|): the error relative to the output's scale."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(1.0, float(np.abs(expected).max()))
  return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


def assert_close(actual, expected, rel=1e-5):
  """|a - e| <= rel * max(1, max |e|), elementwise over the whole array."""
  expected = np.asarray(expected, np.float64)
  actual = np.asarray(actual, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


def run_main_exit_code(argv):
  """Parses `argv` as run.py's flags, runs its main, returns the exit code."""
  import pytest  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  import run  # pylint: disable=import-outside-toplevel
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['run.py', *argv])
  try:
    with pytest.raises(SystemExit) as exit_info:
      run.main(['run.py'])
  finally:
    flags.FLAGS.unparse_flags()
  return exit_info.value.code
