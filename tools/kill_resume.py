r"""Kills run.py with SIGKILL at random moments and checks that it resumes.

    python tools/kill_resume.py --kills 10

Each round starts (or restarts) a tiny pretraining run that checkpoints every
step, waits for a new checkpoint, sleeps a random fraction of a step (so kills
land during computation and during checkpoint writes alike) and SIGKILLs it.
After every kill the latest checkpoint must be complete (every tensor
readable) and no older than the last one seen complete before the kill; the
restart must log that it resumes from exactly that checkpoint. Prints one
line per kill and finally `kills survived: N/N, checkpoints lost: L`.
"""
import argparse
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TFDS = ROOT.parent / 'shared' / 'tfds'


def run_args(model_dir, data):
  dataset = (['--dataset=cifar10', f'--data_dir={TFDS}'] if data == 'cifar10'
             else ['--dataset=shapes10'])
  return [sys.executable, str(ROOT / 'run.py'), '--use_tpu=False',
          '--train_mode=pretrain', '--mode=train', '--eval_split=test',
          '--resnet_depth=18', '--image_size=32', '--train_batch_size=8',
          '--train_steps=100000', '--checkpoint_steps=1',
          '--keep_checkpoint_max=3', '--use_blur=False',
          f'--model_dir={model_dir}', *dataset]


def checkpoint_step(path):
  return int(path.rsplit('-', 1)[1]) if path else 0


def complete(path):
  """True if every tensor of the checkpoint at `path` reads back."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    reader = tf.train.load_checkpoint(path)
    for key in reader.get_variable_to_shape_map():
      reader.get_tensor(key)
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--data', choices=['cifar10', 'shapes10'],
                      default='cifar10' if TFDS.exists() else 'shapes10')
  args = parser.parse_args()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = random.Random(args.seed)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  survived = lost = 0
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = pathlib.Path(tmp) / 'model'
    log_path = pathlib.Path(tmp) / 'log.txt'
    for kill in range(1, args.kills + 1):
      before = tf.train.latest_checkpoint(str(model_dir))
      with open(log_path, 'w') as log:
        proc = subprocess.Popen(run_args(model_dir, args.data), cwd=ROOT,
                                env=env, stdout=log, stderr=log)
        deadline = time.time() + 600
        # Wait for a checkpoint newer than the one we started from.
        while checkpoint_step(tf.train.latest_checkpoint(
            str(model_dir))) <= checkpoint_step(before):
          if proc.poll() is not None or time.time() > deadline:
            print(log_path.read_text()[-2000:])
            raise SystemExit(f'run.py stopped before checkpointing '
                             f'(round {kill})')
          time.sleep(0.05)
        seen = tf.train.latest_checkpoint(str(model_dir))
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
      text = log_path.read_text()
      resumed_ok = before is None or f'Resuming from {before}' in text
      latest = tf.train.latest_checkpoint(str(model_dir))
      ok = (latest is not None and complete(latest) and resumed_ok and
            checkpoint_step(latest) >= checkpoint_step(seen))
      lost += int(checkpoint_step(latest) < checkpoint_step(seen))
      survived += int(ok)
      print(f'kill {kill}: started from {checkpoint_step(before)}, latest '
            f'checkpoint {checkpoint_step(latest)} complete='
            f'{latest is not None and complete(latest)}, resumed from the '
            f'right one={resumed_ok}', flush=True)
  print(f'kills survived: {survived}/{args.kills}, checkpoints lost: {lost}')
  return 0 if survived == args.kills and not lost else 1


if __name__ == '__main__':
  sys.exit(main())
