"""bench/gpu_check.py --quick: the GPU check runs every one of its steps at a
tiny size on any machine, so the script is ready when a GPU is lent."""
import json
import subprocess
import sys

import conftest

TFDS = conftest.SHARED / 'tfds'


def test_quick_mode_runs_every_step(tmp_path):
  conftest.require(TFDS)
  out = tmp_path / 'gpu_check.jsonl'
  proc = subprocess.run(
      [sys.executable, str(conftest.ROOT / 'bench' / 'gpu_check.py'),
       '--quick', f'--data_dir={TFDS}', f'--out={out}'],
      cwd=conftest.ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = [json.loads(l) for l in proc.stdout.splitlines()
             if l.startswith('{')]
  assert printed[-1] == {'bench': 'gpu_check', 'out': str(out)}
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert lines == printed[:-1]
  by_bench = {}
  for line in lines:
    by_bench.setdefault(line['bench'], []).append(line)

  tests, = by_bench['gpu_tests']
  assert (tests['exit_code'], tests['passed'], tests['failed']) == (0, 2, 0)

  ceiling, = by_bench['matmul_ceiling']
  assert ceiling['float32_gflop_per_s'] > 0
  assert ceiling['bfloat16_gflop_per_s'] > 0
  steps = by_bench['train_step']
  assert not [s for s in steps if 'error' in s], steps
  settings = {(s['precision'], s['jit_compile']): s for s in steps}
  assert sorted(settings) == sorted(
      (p, x) for p in ('float32', 'mixed_float16', 'mixed_bfloat16')
      for x in (False, True))
  for (precision, _), step in settings.items():
    assert step['config'] == 'r18_32_b8' and step['images_per_s'] > 0
    # FLOPs are counted on the plain graph, also for the XLA step.
    assert step['step_gflop'] == settings[(precision, False)]['step_gflop']
    assert 'fraction_of_float32_ceiling' in step

  pretraining, = by_bench['gpu_pretraining']
  assert pretraining['exit_code'] == 0, pretraining
  assert (pretraining['step'], pretraining['knn_step']) == (2, 2)
  assert pretraining['images_per_s'] > 0
  # The kNN top-1 of 100 test images: a whole number of hundredths.
  hundredths = pretraining['knn_top_1'] * 100
  assert abs(hundredths - round(hundredths)) < 1e-6
