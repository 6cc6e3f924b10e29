r"""Does ours learn like the original? Pretraining side by side, one evaluator.

  git clone https://github.com/google-research/simclr /tmp/simclr_original
  python bench/learning_vs_original.py --original_dir=/tmp/simclr_original/tf2

For each seed, both run.py files (the original's unmodified, with
TF_USE_LEGACY_KERAS=1, as bench/vs_original.py runs it; the order of the
two alternates between seeds) pretrain ResNet-18 on CIFAR-10 with the same
recipe and step budget: bench/learning.py's options and its command, whose
flags both run.py files take. Ours also gets `--seed=<seed>` and
`--precision` (default here float32, the original's only arithmetic); the
original has no seed flag, so its runs differ by their unseeded
initialisation and input order, as its users' runs do.

Every final checkpoint, the original's included, is then loaded by
`checkpoints.restore_model` into the same model and evaluated by the same
code (bench/learning.py's `evaluate_checkpoint`: weighted kNN and a linear
probe on frozen features), next to a random encoder initialised with each
seed.

Prints one JSON line per evaluated encoder, then a summary line: mean and
sample standard deviation over the seeds of each code's kNN and linear-probe
top-1, the difference of the means, and `within_spread`: whether that
difference is at most the seeds' spread (the larger of the two codes'
standard deviations).

Equal wall time instead of equal steps: give each code the steps it runs in
the budget, e.g. ours with the speed options against the original:

  python bench/learning_vs_original.py --original_dir=... --seeds=0 \
      --train_steps=630 --original_train_steps=300 --checkpoint_steps=30 \
      --precision=mixed_bfloat16

(`--codes=original` runs the original alone, e.g. next to a
`bench/learning.py` run of ours with the same recipe.)
"""
import argparse
import json
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

import console  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':  # before TensorFlow's import (in learning)
  console.hide_native_startup()

import learning  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

CODES = ('ours', 'original')
METRICS = ('knn_top_1', 'linear_top_1')


def parse_args(argv=None):
  p = learning.argument_parser(__doc__.split('\n')[0])
  # The step budget of the side-by-side runs, in float32: the original's
  # arithmetic (it has no other).
  p.set_defaults(train_steps=50, train_batch_size=128, precision='float32',
                 eval_steps=10, checkpoint_steps=50)
  p.add_argument('--original_dir', required=True,
                 help="the original's tf2/ directory (holding its run.py)")
  p.add_argument('--seeds', default='0,1,2',
                 help='comma-separated: one run of each code per seed (ours '
                 'gets it as --seed, the random encoders as initialisation; '
                 '--seed is ignored)')
  p.add_argument('--codes', default='ours,original',
                 help='which run.py files to pretrain with')
  p.add_argument('--original_train_steps', type=int, default=None,
                 help="the original's --train_steps (default: "
                 '--train_steps): for equal wall time rather than steps')
  p.add_argument('--work_dir', default=None,
                 help='where the model_dirs go (default: a new temp dir); '
                 'each run logs to <model_dir>/pretrain.log')
  args = p.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s]
  args.codes = [c for c in args.codes.split(',') if c]
  bad = [c for c in args.codes if c not in CODES]
  if bad or not args.codes:
    p.error(f'--codes={",".join(args.codes)}: expected ours and/or original')
  # The original trains in whole loops of --checkpoint_steps: it would
  # overshoot any other step count (to the next multiple).
  for flag, steps in (('--train_steps', args.train_steps),
                      ('--original_train_steps', args.original_train_steps)):
    if steps and steps % args.checkpoint_steps:
      p.error(f'{flag}={steps}: expected a multiple of --checkpoint_steps='
              f"{args.checkpoint_steps} (the original's run.py trains whole "
              'loops of it)')
  if not (pathlib.Path(args.original_dir) / 'run.py').is_file():
    p.error(f'--original_dir={args.original_dir} has no run.py: expected the '
            'tf2/ directory of google-research/simclr')
  return args


def pretrain(args, code, seed, model_dir):
  """Runs one pretraining to its end; (wall seconds, train steps, command)."""
  recipe = argparse.Namespace(**vars(args))
  recipe.seed = seed
  if code == 'original':
    recipe.train_steps = args.original_train_steps or args.train_steps
    command = learning.pretrain_command(
        recipe, model_dir, pathlib.Path(args.original_dir) / 'run.py')
    cwd, env_extra = args.original_dir, {'TF_USE_LEGACY_KERAS': '1'}
  else:
    command = learning.pretrain_command(recipe, model_dir)
    cwd, env_extra = ROOT, {}
  env = dict(console.user_environment(), **env_extra)
  log_path = pathlib.Path(model_dir) / 'pretrain.log'
  print(f'{code}, seed {seed}: ' + shlex.join(command[1:]) + f'  > {log_path}',
        file=sys.stderr, flush=True)
  start = time.time()
  with open(log_path, 'w') as log:
    exit_code = subprocess.run(command, cwd=cwd, env=env, stdout=log,
                               stderr=subprocess.STDOUT,
                               check=False).returncode
  if exit_code:
    tail = log_path.read_text(errors='replace').strip().splitlines()[-10:]
    sys.exit('\n'.join(tail) + f'\nerror: {code} run.py (seed {seed}) '
             f'stopped with exit code {exit_code}; the end of {log_path} is '
             'above.')
  return time.time() - start, recipe.train_steps, command


def summarise(records, codes):
  """Means and spreads over the seeds; the difference of the codes' means."""
  groups = {name: [r for r in records if r['encoder'] == name]
            for name in (*codes, 'random')}
  summary = {'bench': 'learning_vs_original_summary',
             'seeds': len(groups['random'])}
  for name, rows in groups.items():
    summary[name] = {}
    for metric in METRICS:
      values = [r[metric] for r in rows]
      summary[name][metric] = {
          'mean': round(statistics.fmean(values), 4),
          'std': round(statistics.stdev(values), 4) if len(values) > 1
                 else None,
          'values': values}
  if set(CODES) <= set(codes):
    for metric in METRICS:
      ours, original = summary['ours'][metric], summary['original'][metric]
      spread = max(ours['std'] or 0.0, original['std'] or 0.0)
      difference = ours['mean'] - original['mean']
      summary[f'{metric}_ours_minus_original'] = round(difference, 4)
      summary[f'{metric}_within_spread'] = (
          None if len(groups['ours']) < 2 else abs(difference) <= spread)
  return summary


def main(argv=None):
  tf.get_logger().setLevel('ERROR')  # Keras deprecation notes
  args = parse_args(argv)
  work_dir = pathlib.Path(args.work_dir or tempfile.mkdtemp(
      prefix='simclr_learning_vs_original_'))
  cfg = learning.evaluation_config(args)
  source = data_lib.get_source(cfg.dataset, cfg.data_dir)
  records = []
  for index, seed in enumerate(args.seeds):
    # Alternate which code runs first, so drift on the machine hits both.
    order = args.codes if index % 2 == 0 else args.codes[::-1]
    runs = []
    for code in order:
      model_dir = work_dir / f'{code}_seed{seed}'
      model_dir.mkdir(parents=True, exist_ok=True)
      runs.append((code, model_dir, *pretrain(args, code, seed, model_dir)))
    evaluated = [('random', None, None, 0, None)] + runs
    for name, model_dir, wall, steps, command in evaluated:
      checkpoint = model_dir and tf.train.latest_checkpoint(
          str(model_dir))
      if model_dir and not checkpoint:
        sys.exit(f'error: {name} run.py (seed {seed}) left no checkpoint in '
                 f'{model_dir}')
      result = learning.evaluate_checkpoint(cfg, source, seed, checkpoint)
      record = {'bench': 'learning_vs_original', 'encoder': name,
                'seed': seed, **{m: result[m] for m in METRICS},
                'result': result}
      if model_dir:
        images = steps * args.train_batch_size
        record.update(
            precision=args.precision if name == 'ours' else 'float32',
            train_steps=steps, train_batch_size=args.train_batch_size,
            pretrain_wall_s=round(wall, 1),
            pretrain_images_per_s=round(images / wall, 1),
            command='python ' + shlex.join(command[1:]))
      records.append(record)
      print(json.dumps(record), flush=True)
  summary = summarise(records, args.codes)
  summary.update(
      model=f'ResNet-{args.resnet_depth} width {args.width_multiplier} at '
            f'{args.image_size}px', dataset=args.dataset,
      machine=learning.machine(), work_dir=str(work_dir))
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  main()
