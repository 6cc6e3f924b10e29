"""Pretraining learns: the README's set-up command, run as written (seeded),
gives an encoder whose kNN accuracy is far above that of random encoders of
the same architecture, and says so in one console line.

The reference is measured here, not written down: the kNN accuracy of
RANDOM_SEEDS randomly initialised encoders, evaluated exactly as the run's
(`knn_monitor`, the README's k, T and bank). The test asks the pretrained
encoder to beat their mean by MIN_STDS of their standard deviation and by
MIN_GAP absolute (the README's promise). Measured figures are in the
README's "Set-up" and the closing notes, not here.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import tensorflow as tf
import tf_keras as keras

import config as config_lib
import data as data_lib
import knn_monitor
import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANDOM_SEEDS = tuple(range(1, 6))
MIN_STDS = 5
MIN_GAP = 0.15
# Native start-up lines and library notes that the console must not show.
CHATTER = ('oneDNN', 'cpu_feature_guard', 'cuda', 'WARNING:tensorflow',
           'absl::InitializeLog', 'XLA service', 'Skipping full serialization',
           'Reusing dataset', 'Constructing tf.data.Dataset')


def readme_setup_command():
  """The flags of the `python run.py` line of the README's set-up."""
  text = (ROOT / 'README.md').read_text()
  setup = text[text.index('## Set-up'):text.index('\n## ', text.index(
      '## Set-up') + 1)]
  line = next(l for l in setup.splitlines() if l.startswith('python run.py'))
  return line.split()[2:]


def flag_values(args):
  values = {}
  for arg in args:
    name, _, value = arg[2:].partition('=')
    values[name] = value or 'true'
  return values


def random_encoder_knn(source, cfg, seed):
  keras.utils.set_random_seed(seed)
  model = model_lib.Model(source.num_classes, cfg)
  model(tf.zeros([1, cfg.image_size, cfg.image_size, 3]), training=False)
  return knn_monitor.KnnMonitor(
      source, tf.distribute.get_strategy(), cfg,
      lambda images: model.resnet_model(images, training=False),
  ).evaluate().top_1_accuracy


def test_readme_setup_command_learns(shapes10_dir, tmp_path):
  args = readme_setup_command()
  flags = flag_values(args)
  assert flags.get('optimizer', 'lars') == 'lars', 'the recipe uses LARS'
  assert 'seed' in flags, 'the set-up command is seeded'
  args = [a for a in args if not a.startswith('--model_dir=')]
  env = dict(os.environ)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # the console a user sees
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'run.py'), *args,
       f'--model_dir={tmp_path}', f'--data_dir={shapes10_dir}'],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  console = proc.stdout + proc.stderr
  assert proc.returncode == 0, console[-3000:]
  result = json.loads((tmp_path / 'result.json').read_text())
  pretrained = result['eval/knn_top_1_accuracy']
  own_start = result['eval/knn_top_1_accuracy_random_init']

  line = re.search(r'kNN top-1: pretrained ([\d.]+), random init ([\d.]+)',
                   console)
  assert line, console[-3000:]
  assert (float(line.group(1)), float(line.group(2))) == (
      round(pretrained, 3), round(own_start, 3))
  shown = [c for c in CHATTER if c.lower() in console.lower()]
  assert not shown, (shown, console[:3000])

  source = data_lib.get_source('shapes10', str(shapes10_dir))
  cfg = config_lib.Config(**json.loads(
      (tmp_path / 'flags.json').read_text())).validate()
  # The run's random init is its own start: the same seed gives the same
  # encoder here (features may round differently in another process).
  assert abs(random_encoder_knn(source, cfg, cfg.seed) - own_start) <= 0.002
  random = [own_start] + [random_encoder_knn(source, cfg, seed)
                          for seed in RANDOM_SEEDS]
  mean, std = np.mean(random), np.std(random, ddof=1)
  print(f'kNN top-1: pretrained {pretrained:.3f}; random encoders mean '
        f'{mean:.3f}, std {std:.4f}, max {max(random):.3f}; margin '
        f'{(pretrained - mean) / std:.1f} std')
  assert pretrained - mean >= MIN_STDS * std, (pretrained, random)
  assert pretrained - own_start >= MIN_GAP, (pretrained, own_start)
