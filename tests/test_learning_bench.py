"""bench/learning.py and bench/learning_vs_original.py: the commands they run
and the summary's arithmetic (the runs themselves are benchmarks, not tests)."""
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench'))

# The benches set TF_CPP_MIN_LOG_LEVEL for themselves (bench/augment.py on
# import); later tests in this worker run run.py with the user's console.
_ENVIRON = dict(os.environ)
import learning  # noqa: E402  pylint: disable=wrong-import-position
import learning_vs_original  # noqa: E402  pylint: disable=wrong-import-position
os.environ.clear()
os.environ.update(_ENVIRON)

# Flags our run.py has and the original's does not: an unknown flag stops
# the original's absl parser before it trains.
OURS_ONLY = ('--seed=', '--precision=', '--train_summary_steps=')


def test_the_original_gets_only_the_recipe(tmp_path):
  original = tmp_path / 'tf2'
  original.mkdir()
  (original / 'run.py').write_text('')
  args = learning_vs_original.parse_args([
      f'--original_dir={original}', '--train_steps=100',
      '--temperature=0.2', '--precision=mixed_bfloat16'])
  ours = learning.pretrain_command(args, 'md')
  theirs = learning.pretrain_command(args, 'md', original / 'run.py')
  assert theirs[1] == str(original / 'run.py')
  assert ours[1] == str(ROOT / 'run.py')
  for flag in OURS_ONLY:
    assert not [f for f in theirs if f.startswith(flag)], flag
  assert '--precision=mixed_bfloat16' in ours and '--seed=0' in ours
  # Everything else, the recipe, is the same in both.
  shared = [f for f in ours[2:] if not f.startswith(OURS_ONLY)]
  assert shared == theirs[2:]
  assert '--train_steps=100' in theirs and '--temperature=0.2' in theirs


def test_bad_codes_and_original_dir_stop_with_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit):
    learning_vs_original.parse_args([f'--original_dir={tmp_path}'])
  assert f'--original_dir={tmp_path} has no run.py' in capsys.readouterr().err
  (tmp_path / 'run.py').write_text('')
  with pytest.raises(SystemExit):
    learning_vs_original.parse_args([f'--original_dir={tmp_path}',
                                     '--codes=ours,theirs'])
  assert 'expected ours and/or original' in capsys.readouterr().err


def records(encoder, knn, linear):
  return [{'encoder': encoder, 'knn_top_1': k, 'linear_top_1': l}
          for k, l in zip(knn, linear)]


def test_summary_means_spreads_and_verdict():
  rows = (records('ours', [0.30, 0.32, 0.34], [0.40, 0.40, 0.43]) +
          records('original', [0.31, 0.31, 0.31], [0.30, 0.32, 0.34]) +
          records('random', [0.20, 0.22, 0.21], [0.25, 0.25, 0.25]))
  summary = learning_vs_original.summarise(rows, ['ours', 'original'])
  assert summary['seeds'] == 3
  assert summary['ours']['knn_top_1']['mean'] == pytest.approx(0.32)
  # Sample standard deviation (n - 1): sqrt((0.02^2 + 0 + 0.02^2) / 2).
  assert summary['ours']['knn_top_1']['std'] == pytest.approx(0.02)
  assert summary['original']['knn_top_1']['std'] == pytest.approx(0.0)
  assert summary['random']['knn_top_1']['mean'] == pytest.approx(0.21)
  # kNN: 0.01 apart, spread 0.02 (ours'): within.
  assert summary['knn_top_1_ours_minus_original'] == pytest.approx(0.01)
  assert summary['knn_top_1_within_spread'] is True
  # Linear: 0.41 against 0.32, spreads 0.0173 and 0.02: outside.
  assert summary['linear_top_1_ours_minus_original'] == pytest.approx(0.09)
  assert summary['linear_top_1_within_spread'] is False


def test_one_seed_gives_no_verdict():
  rows = (records('ours', [0.3], [0.4]) + records('original', [0.3], [0.4]) +
          records('random', [0.2], [0.3]))
  summary = learning_vs_original.summarise(rows, ['ours', 'original'])
  assert summary['ours']['knn_top_1']['std'] is None
  assert summary['knn_top_1_within_spread'] is None


def test_steps_must_be_whole_loops_of_the_original(tmp_path, capsys):
  (tmp_path / 'run.py').write_text('')
  with pytest.raises(SystemExit):
    learning_vs_original.parse_args([
        f'--original_dir={tmp_path}', '--train_steps=60',
        '--original_train_steps=45', '--checkpoint_steps=30'])
  assert '--original_train_steps=45: expected a multiple of' in (
      capsys.readouterr().err)
  args = learning_vs_original.parse_args([
      f'--original_dir={tmp_path}', '--train_steps=60',
      '--original_train_steps=90', '--checkpoint_steps=30'])
  assert (args.train_steps, args.original_train_steps) == (60, 90)
