r"""One prepared run that proves and measures the GPU paths.

  python bench/gpu_check.py --data_dir=<TFDS dir holding cifar10>  # one GPU
  python bench/gpu_check.py --quick   # any machine: the same paths, tiny

Three steps, each a subprocess of the project's own commands, each
printing one JSON line per figure (all of them also go to --out):

1. `gpu_tests`: the tests of the GPU-relevant paths (precisions and loss
   scaling, XLA, fused batch norm, MirroredStrategy) run on this machine's
   devices: tests/test_speed_options.py and tests/test_distributed.py
   (--quick: two of them). The line counts passed and failed.
2. `train_step` (bench/train_step.py): ResNet-50 at 224 px, batch 128 and
   256, in float32, mixed_float16 and mixed_bfloat16, each with and without
   --jit_compile: images/s, GFLOP/s against a matmul ceiling measured in
   the same run, peak GPU memory (--quick: ResNet-18 at 32 px, batch 8,
   every setting in one process).
3. `gpu_pretraining`: run.py pretraining ResNet-18 on CIFAR-10 with the kNN
   monitor, in mixed_float16 with XLA on a GPU (float32 on a CPU): the
   last progress line's images/s and the monitor's kNN top-1 (--quick: 2
   steps and a bank of 100).

The device machine gets the repository only: copy ../shared/tfds into an
ignored folder of the checkout that the run carries, and pass it as
--data_dir. `tests/test_gpu_check.py` runs --quick, so this script cannot
rot while no GPU is at hand.
"""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

FULL = dict(
    tests=['tests/test_speed_options.py', 'tests/test_distributed.py'],
    configs='r50_224_b128,r50_224_b256', seconds=5, matmul_size=8192,
    pretrain=['--train_steps=300', '--train_batch_size=512',
              '--knn_monitor_steps=300', '--knn_bank_size=10000',
              '--checkpoint_steps=300', '--train_summary_steps=50',
              '--precision=mixed_float16', '--jit_compile'])
QUICK = dict(
    tests=['tests/test_speed_options.py::test_xla_refuses_several_replicas',
           'tests/test_speed_options.py::'
           'test_fused_batch_norm_freezes_like_the_unfused_layer'],
    configs='r18_32_b8', seconds=1, matmul_size=256, in_process=True,
    pretrain=['--train_steps=2', '--train_batch_size=8',
              '--knn_monitor_steps=2', '--knn_bank_size=100',
              '--eval_steps=1', '--eval_batch_size=100',
              '--checkpoint_steps=2', '--train_summary_steps=1'])
PRECISIONS = ['float32', 'float32+xla', 'mixed_float16', 'mixed_float16+xla',
              'mixed_bfloat16', 'mixed_bfloat16+xla']


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes: checks the paths on any machine')
  parser.add_argument('--data_dir', default=str(ROOT.parent / 'shared' /
                                                'tfds'),
                      help='TFDS data dir holding cifar10 (default: '
                      '../shared/tfds)')
  parser.add_argument('--out', default=None,
                      help='file for the JSON lines (default: a new file in '
                      'the temporary directory)')
  return parser.parse_args(argv)


def run(command, timeout=900):
  """(exit code, stdout + stderr, seconds) of a command in the repository."""
  start = time.time()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  return proc.returncode, proc.stdout + proc.stderr, time.time() - start


def gpu_tests(plan):
  code, text, seconds = run([sys.executable, '-m', 'pytest', '-q', '-p',
                             'no:cacheprovider', *plan['tests']])
  counts = {word: int(n) for n, word in
            re.findall(r'(\d+) (passed|failed|skipped|errors?)', text)}
  return [{'bench': 'gpu_tests', 'exit_code': code,
           'passed': counts.get('passed', 0),
           'failed': counts.get('failed', 0),
           'skipped': counts.get('skipped', 0),
           'seconds': round(seconds, 1), 'tests': plan['tests']}]


def train_steps(plan):
  code, text, _ = run([sys.executable, 'bench/train_step.py',
                       f'--configs={plan["configs"]}',
                       f'--precisions={",".join(PRECISIONS)}',
                       f'--seconds={plan["seconds"]}',
                       f'--matmul_size={plan["matmul_size"]}',
                       *(['--in_process'] if plan.get('in_process') else [])],
                      timeout=1800)
  lines = [json.loads(line) for line in text.splitlines()
           if line.startswith('{')]
  if code:
    lines.append({'bench': 'train_step', 'exit_code': code,
                  'error': text.strip().splitlines()[-1][:300]})
  return lines  # a failed setting has its own line with 'error'


def pretraining(plan, data_dir, quick):
  model_dir = tempfile.mkdtemp(prefix='gpu_check_')
  code, text, seconds = run(
      [sys.executable, 'run.py', '--train_mode=pretrain', '--dataset=cifar10',
       f'--data_dir={data_dir}', '--eval_split=test', '--image_size=32',
       '--resnet_depth=18', '--learning_rate=1.0', '--weight_decay=1e-4',
       '--temperature=0.5', '--use_blur=False', '--color_jitter_strength=0.5',
       '--warmup_epochs=0', '--use_tpu=False', f'--model_dir={model_dir}',
       '--mode=train', *plan['pretrain']], timeout=1800)
  rates = re.findall(r'step (\d+)/\d+ \| ([\d.]+) images/s', text)
  knn = re.findall(r'kNN monitor at step (\d+): top-1 ([\d.]+)', text)
  line = {'bench': 'gpu_pretraining', 'exit_code': code,
          'flags': plan['pretrain'], 'model_dir': model_dir,
          'seconds': round(seconds, 1), 'quick': quick}
  if rates:
    line.update(step=int(rates[-1][0]), images_per_s=float(rates[-1][1]))
  if knn:
    line.update(knn_step=int(knn[-1][0]), knn_top_1=float(knn[-1][1]))
  if code:
    line['error'] = text.strip().splitlines()[-1][:300]
  return [line]


def main(argv=None):
  args = parse_args(argv)
  plan = QUICK if args.quick else FULL
  out = args.out or tempfile.mkstemp(prefix='gpu_check_', suffix='.jsonl')[1]
  pretrain = plan['pretrain']
  if args.quick or not _has_gpu():
    # mixed_float16 and XLA are the GPU settings; a CPU runs float32.
    pretrain = [f for f in pretrain
                if not f.startswith(('--precision', '--jit_compile'))]
  with open(out, 'w') as f:
    for lines in (gpu_tests(plan), train_steps(plan),
                  pretraining(dict(plan, pretrain=pretrain), args.data_dir,
                              args.quick)):
      for line in lines:
        text = json.dumps(line)
        print(text, flush=True)
        f.write(text + '\n')
  print(json.dumps({'bench': 'gpu_check', 'out': out}), flush=True)


def _has_gpu():
  code, text, _ = run([sys.executable, '-c', 'import tensorflow as tf; '
                       'print(len(tf.config.list_physical_devices("GPU")))'])
  return code == 0 and text.strip().splitlines()[-1] != '0'


if __name__ == '__main__':
  main()
