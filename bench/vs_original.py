r"""End-to-end speed of this code next to the original google-research/simclr.

  git clone https://github.com/google-research/simclr /tmp/simclr_original
  python bench/vs_original.py --original_dir=/tmp/simclr_original/tf2
  python bench/vs_original.py --original_dir=... --e2e_loop_steps=50 --e2e_loops=4

Both run.py files pretrain R18 / 32 px / batch 128 (--resnet_depth,
--image_size, --train_batch_size) on CIFAR-10 (--data_dir) from a fresh
model_dir for --e2e_loop_steps * --e2e_loops steps, checkpointing (and so
logging) every --e2e_loop_steps steps: the same loop structure in both, with
the README's CIFAR-10 pretraining flags. Ours runs at each of --precisions;
the original is float32 (it has no mixed precision) and runs unmodified
with TF_USE_LEGACY_KERAS=1 (it needs Keras 2, i.e. tf_keras, behind TensorFlow's
Keras namespace).

images/s comes from the absl timestamps of the progress lines (ours
`step N/T | ...`, the original's `Completed: N / T steps`): the steps
between the first and the last line over the time between them. The first
loop (start-up, tracing, the input pipeline filling) is left out; what
remains is steady-state training with its input pipeline, checkpoint saves
and metric logging, as in a real run.

Every measurement runs in its own subprocess, and the codes alternate
(--rounds rounds; odd rounds reverse the order, so drift on a shared machine
falls on both). Prints one JSON line per measurement, then a summary line
with the median images/s of each and each setting's ratio to the
original. bench/train_step.py measures our step alone.
"""
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string('original_dir', None,
                    "The original's tf2/ directory (holding its run.py).")
flags.mark_flag_as_required('original_dir')
flags.DEFINE_integer('rounds', 2, 'Alternating rounds of measurements.')
flags.DEFINE_list('precisions', ['float32', 'mixed_bfloat16'],
                  'Settings of ours to measure: a precision policy, with '
                  '"+fused" for --fused_batch_norm=True (float32+fused) or '
                  '"+unfused" for False.')
flags.DEFINE_integer('resnet_depth', 18, 'ResNet depth.')
flags.DEFINE_integer('image_size', 32, 'Image side.')
flags.DEFINE_integer('train_batch_size', 128, 'Global batch size.')
flags.DEFINE_string('data_dir', os.path.join(os.path.dirname(_REPO_DIR),
                                          'shared', 'tfds'),
                    'TFDS data directory holding cifar10.')
flags.DEFINE_integer('e2e_loop_steps', 20, 'End to end: steps per loop, '
                     'i.e. --checkpoint_steps of both run.py files.')
flags.DEFINE_integer('e2e_loops', 4, 'End to end: loops per run (>= 2; the '
                     'first is not timed).')
flags.DEFINE_string('work_dir', None, 'End to end: where the temporary '
                    'model_dirs go (default: the system temp dir).')
flags.DEFINE_integer('timeout', 3600, 'Seconds before a subprocess is '
                     'killed.')
flags.DEFINE_string('python', sys.executable, 'Python that runs both codes.')

# An absl log line: I<MMDD> <hh:mm:ss.ffffff> <thread> <file:line>] <message>
_LOG_LINE = re.compile(
    r'^I(\d\d)(\d\d) (\d\d):(\d\d):(\d\d(?:\.\d+)?)\s+\d+\s+\S+\] (.*)$')
_PROGRESS = {
    'ours': re.compile(r'^step (\d+)/\d+ \|'),
    'original': re.compile(r'^Completed: (\d+) / \d+ steps'),
}


def config_name():
  return (f'r{FLAGS.resnet_depth}_{FLAGS.image_size}_'
          f'b{FLAGS.train_batch_size}')


def run_subprocess(cmd, cwd, env_extra=None):
  """(returncode, stdout, stderr, wall seconds) of `cmd`."""
  env = dict(os.environ, **(env_extra or {}))
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=FLAGS.timeout, check=False)
    result = proc.returncode, proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    result = -9, e.stdout or '', (e.stderr or '') + '\n[timed out]'
  return (*result, time.perf_counter() - start)


def failure(record, rc, stderr):
  # The tail says why without flooding the output.
  record.update(error=f'exit status {rc}',
                stderr_tail=stderr.strip().splitlines()[-15:])
  return record


def progress_points(code, log_text, year):
  """[(unix time, step)] of the progress lines of `code`'s run.py log."""
  points = []
  for line in log_text.splitlines():
    match = _LOG_LINE.match(line)
    if not match:
      continue
    month, day, hour, minute, second, message = match.groups()
    progress = _PROGRESS[code].match(message)
    if not progress:
      continue
    sec = float(second)
    stamp = datetime.datetime(year, int(month), int(day), int(hour),
                              int(minute), int(sec),
                              int(round((sec % 1) * 1e6)) % 1000000)
    points.append((stamp.timestamp(), int(progress.group(1))))
  return points


def ours_flags(setting):
  """run.py flags of a --precisions entry such as 'float32+fused'."""
  precision, _, batch_norm = setting.partition('+')
  extra = {'': [], 'fused': ['--fused_batch_norm=True'],
           'unfused': ['--fused_batch_norm=False']}[batch_norm]
  return [f'--precision={precision}', *extra]


def end_to_end(code, precision):
  """Pretrains with `code`'s run.py on CIFAR-10; steady-state images/s."""
  loop, loops = FLAGS.e2e_loop_steps, FLAGS.e2e_loops
  model_dir = tempfile.mkdtemp(prefix=f'vs_original_{code}_',
                               dir=FLAGS.work_dir)
  # The comparison setting in flags both run.py files accept. eval_split:
  # cifar10 has no 'validation' split, and both read the eval split's size
  # at start-up.
  common = [
      '--train_mode=pretrain', '--mode=train', '--dataset=cifar10',
      f'--data_dir={FLAGS.data_dir}', '--train_split=train',
      '--eval_split=test', f'--resnet_depth={FLAGS.resnet_depth}',
      f'--image_size={FLAGS.image_size}',
      f'--train_batch_size={FLAGS.train_batch_size}',
      f'--train_steps={loop * loops}', f'--checkpoint_steps={loop}',
      '--use_blur=False', '--color_jitter_strength=0.5',
      '--learning_rate=1.0', '--temperature=0.5', '--weight_decay=1e-6',
      '--use_tpu=False', f'--model_dir={model_dir}']
  if code == 'ours':
    cmd = [FLAGS.python, os.path.join(_REPO_DIR, 'run.py'), *common,
           *ours_flags(precision), '--knn_monitor_steps=0']
    cwd, env = _REPO_DIR, None
  else:
    cmd = [FLAGS.python, os.path.join(FLAGS.original_dir, 'run.py'), *common]
    cwd, env = FLAGS.original_dir, {'TF_USE_LEGACY_KERAS': '1'}
  year = datetime.datetime.now().year
  try:
    rc, _, err, wall = run_subprocess(cmd, cwd, env)
  finally:
    shutil.rmtree(model_dir, ignore_errors=True)
  record = {'bench': 'end_to_end', 'code': code, 'config': config_name(),
            'precision': precision, 'batch': FLAGS.train_batch_size,
            'steps': loop * loops, 'loop_steps': loop,
            'wall_s': round(wall, 1)}
  points = progress_points(code, err, year)
  if rc or len(points) < 2:
    record = failure(record, rc, err)
    record['progress_lines'] = len(points)
    return record
  (t0, s0), (t1, s1) = points[0], points[-1]
  record.update(
      images_per_s=round((s1 - s0) * FLAGS.train_batch_size / (t1 - t0), 2),
      timed_steps=s1 - s0, timed_s=round(t1 - t0, 2))
  return record


def summary(mode, records):
  by_key = {}
  for r in records:
    if 'images_per_s' in r:
      key = 'original' if r['code'] == 'original' else f'ours_{r["precision"]}'
      by_key.setdefault(key, []).append(r['images_per_s'])
  medians = {k: round(statistics.median(v), 2) for k, v in by_key.items()}
  original = medians.get('original')

  def ratio(key):
    if not original or key not in medians:
      return None
    return round(medians[key] / original, 3)

  return {'bench': 'vs_original_summary', 'mode': mode,
          'config': config_name(), 'rounds': FLAGS.rounds,
          'measurements': {k: len(v) for k, v in by_key.items()},
          'median_images_per_s': medians,
          'ratio_over_original': {
              k: ratio(k) for k in medians if k != 'original'}}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  if FLAGS.e2e_loops < 2:
    raise app.UsageError('--e2e_loops must be >= 2: the first loop is not '
                         'timed.')
  if not os.path.isfile(os.path.join(FLAGS.original_dir, 'run.py')):
    raise app.UsageError(f'--original_dir={FLAGS.original_dir} has no '
                         'run.py: expected the tf2/ directory of '
                         'google-research/simclr.')
  # One task per measurement; the codes alternate within a round.
  tasks = [('original', 'float32')] + [('ours', p) for p in FLAGS.precisions]
  mode = 'end_to_end'
  records = []
  for round_index in range(FLAGS.rounds):
    order = tasks if round_index % 2 == 0 else tasks[::-1]
    for code, precision in order:
      record = end_to_end(code, precision)
      record['round'] = round_index
      records.append(record)
      print(json.dumps(record), flush=True)
  print(json.dumps(summary(mode, records)), flush=True)


if __name__ == '__main__':
  app.run(main)
