"""Does pretraining learn? SimCLR on CIFAR-10 against a random encoder.

Pretrains ResNet-18 at 32x32 on the CIFAR-10 train split with `run.py` (a
subprocess running exactly the command it prints), then evaluates the
pretrained encoder and a randomly initialised encoder of the same
architecture the same way, on the test split:

* `knn_top_1`: weighted k-NN top-1 (`knn_monitor.py`: cosine, k=200, T=0.1)
  of the `final_avg_pool` features of the test images against those of the
  train split (both with eval preprocessing, batch norm in inference mode);
* `linear_top_1`: linear evaluation on the same frozen features: an
  L2-regularised multinomial logistic regression fitted on the train
  features, its L2 weight chosen on a held-out fifth of them, no
  augmentation (the SimCLR paper's protocol for its linear transfer
  results, with full-batch Adam here rather than L-BFGS);
* pretrained only, `lineareval_while_pretraining_top_1`: the linear head
  that `run.py` trains on stop-gradient features while pretraining.

Prints one JSON line: both results, steps, images seen, wall times, the
machine and the pretraining command. The defaults are the recipe tuned for
30 minutes of pretraining on 2 CPU cores with the speed options (bfloat16,
which turns on fused batch norm, and batched augmentation): see the README
for what was tried and the results. Scale by flags only, e.g.:

  python bench/learning.py            # 2 CPU cores: 30 minutes + evaluation
  python bench/learning.py --train_steps=12 --knn_bank_size=2000 \\
      --eval_steps=4                  # a check of the path, a few minutes
  python bench/learning.py --train_steps=9800 --train_batch_size=512 \\
      --warmup_epochs=10 --checkpoint_steps=1000   # GPU: 500 epochs of 10k

bench/learning_vs_original.py runs the same recipe through the original's
run.py and ours, evaluated by this file's code.

A `--model_dir` that already holds the finished pretraining is reused
(`run.py` resumes, finds nothing left to do); its wall time is then only
that of the check.
"""
import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import console  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':  # an importer keeps its own environment
  console.hide_native_startup()

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tf_keras as keras  # pylint: disable=g-import-not-at-top

import checkpoints  # pylint: disable=g-import-not-at-top
import config as config_lib  # pylint: disable=g-import-not-at-top
import data as data_lib  # pylint: disable=g-import-not-at-top
import knn_monitor  # pylint: disable=g-import-not-at-top
import model as model_lib  # pylint: disable=g-import-not-at-top

sys.path.insert(0, str(ROOT / 'bench'))
from augment import machine  # pylint: disable=g-import-not-at-top,wrong-import-position


def argument_parser(description):
  """The pretraining recipe's and the evaluation's options."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--dataset', default='cifar10')
  p.add_argument('--data_dir', default=str(ROOT.parent / 'shared' / 'tfds'))
  p.add_argument('--train_split', default='train')
  p.add_argument('--eval_split', default='test')
  p.add_argument('--model_dir', default=None,
                 help='where run.py writes (default: a new temporary dir)')
  # The pretraining recipe: run.py's flags of the same names.
  p.add_argument('--train_steps', type=int, default=630)
  p.add_argument('--train_batch_size', type=int, default=128)
  p.add_argument('--learning_rate', type=float, default=2.0)
  p.add_argument('--temperature', type=float, default=0.2)
  p.add_argument('--weight_decay', type=float, default=1e-4)
  p.add_argument('--warmup_epochs', type=float, default=0.3)
  p.add_argument('--color_jitter_strength', type=float, default=0.5)
  p.add_argument('--resnet_depth', type=int, default=18)
  p.add_argument('--width_multiplier', type=int, default=1)
  p.add_argument('--image_size', type=int, default=32)
  p.add_argument('--checkpoint_steps', type=int, default=100)
  p.add_argument('--precision', default='mixed_bfloat16',
                 help="our run.py's --precision (the speed option on CPUs "
                 'with bfloat16, as on TPUs; float32 is the original\'s '
                 'arithmetic)')
  p.add_argument('--run_flag', action='append', default=[],
                 help='extra flag for run.py, e.g. --run_flag=--global_bn=False'
                 ' (repeatable)')
  # The evaluation.
  p.add_argument('--eval_batch_size', type=int, default=500)
  p.add_argument('--knn_bank_size', type=int, default=0,
                 help='train examples in the kNN bank and linear fit (the '
                 'first ones; 0: all)')
  p.add_argument('--eval_steps', type=int, default=0,
                 help='eval batches of test queries (0: the whole split)')
  p.add_argument('--seed', type=int, default=0,
                 help="our run.py's --seed (initialisation, input order, "
                 'augmentations); the random encoder\'s initialisation and '
                 "the probe's validation split")
  return p


def parse_args(argv=None):
  return argument_parser(__doc__.split('\n')[0]).parse_args(argv)


def pretrain_command(args, model_dir, run_py=None):
  """The command line of the pretraining with ours or the original's run.py.

  `run_py`: None for ours, else the original's (google-research/simclr
  tf2/run.py), which gets only flags it has: the recipe, not --seed or
  --precision.
  """
  command = [
      sys.executable, str(run_py or ROOT / 'run.py'), '--use_tpu=False',
      '--mode=train', '--train_mode=pretrain',
      f'--dataset={args.dataset}', f'--data_dir={args.data_dir}',
      f'--train_split={args.train_split}', f'--eval_split={args.eval_split}',
      f'--train_steps={args.train_steps}',
      f'--train_batch_size={args.train_batch_size}',
      f'--learning_rate={args.learning_rate}',
      f'--temperature={args.temperature}',
      f'--weight_decay={args.weight_decay}',
      f'--warmup_epochs={args.warmup_epochs}',
      f'--color_jitter_strength={args.color_jitter_strength}',
      '--use_blur=False', f'--resnet_depth={args.resnet_depth}',
      f'--width_multiplier={args.width_multiplier}',
      f'--image_size={args.image_size}',
      f'--checkpoint_steps={args.checkpoint_steps}',
      '--lineareval_while_pretraining=True', f'--model_dir={model_dir}']
  if run_py is None:
    command += [f'--seed={args.seed}', f'--precision={args.precision}',
                '--train_summary_steps=10']
  return command + args.run_flag


@tf.function(reduce_retracing=True)
def fit_logistic(x, onehot, l2, steps, learning_rate=0.01):
  """(w, b) of a softmax regression: full-batch Adam on CE + l2 ||w||^2 / 2."""
  w = tf.zeros([tf.shape(x)[1], tf.shape(onehot)[1]])
  b = tf.zeros([tf.shape(onehot)[1]])
  moments = [tf.zeros_like(w), tf.zeros_like(w), tf.zeros_like(b),
             tf.zeros_like(b)]
  for t in tf.range(1, steps + 1):
    with tf.GradientTape() as tape:
      tape.watch([w, b])
      loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
          onehot, tf.matmul(x, w) + b)) + l2 * tf.nn.l2_loss(w)
    grad_w, grad_b = tape.gradient(loss, [w, b])
    t = tf.cast(t, tf.float32)
    updated = []
    for value, grad, m, v in ((w, grad_w, *moments[:2]),
                              (b, grad_b, *moments[2:])):
      m = 0.9 * m + 0.1 * grad
      v = 0.999 * v + 0.001 * grad * grad
      step = learning_rate * (m / (1 - 0.9 ** t)) / (
          tf.sqrt(v / (1 - 0.999 ** t)) + 1e-7)
      updated.append((value - step, m, v))
    (w, mw, vw), (b, mb, vb) = updated
    moments = [mw, vw, mb, vb]
  return w, b


def linear_probe(train_x, train_y, test_x, test_y, num_classes,
                 l2_weights=(1e-5, 1e-4, 1e-3, 1e-2), steps=300, seed=0):
  """Top-1 of a logistic regression on frozen features, and its L2 weight.

  Features are standardised with the train statistics; the L2 weight is
  the one with the best accuracy on a held-out fifth of the train
  features, then the classifier is refitted on all of them.
  """
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  order = np.random.RandomState(seed).permutation(len(train_x))
  val, fit = order[:len(order) // 5], order[len(order) // 5:]

  def fit_and_score(x, y, eval_x, eval_y, l2):
    w, b = fit_logistic(tf.constant(x, tf.float32),
                        tf.one_hot(y, num_classes), tf.constant(l2),
                        tf.constant(steps))
    predicted = np.argmax(eval_x @ w.numpy() + b.numpy(), axis=1)
    return float(np.mean(predicted == eval_y))

  scores = {l2: fit_and_score(train_x[fit], train_y[fit], train_x[val],
                              train_y[val], l2) for l2 in l2_weights}
  best = max(scores, key=scores.get)
  return fit_and_score(train_x, train_y, test_x, test_y, best), best


def evaluate_encoder(cfg, source, model, seed, head=False):
  """kNN and linear-probe top-1 of `model`'s encoder (and its linear head's)."""
  strategy = tf.distribute.get_strategy()
  monitor = knn_monitor.KnnMonitor(
      source, strategy, cfg,
      lambda images: model.resnet_model(images, training=False))
  start = time.time()
  bank, bank_labels, test, test_labels = monitor.features()
  features_s = time.time() - start
  result = {'knn_top_1': knn_monitor.knn_accuracy(
      test, test_labels, bank, bank_labels, source.num_classes, cfg.knn_k,
      cfg.knn_temperature)}
  result['linear_top_1'], result['linear_l2'] = linear_probe(
      bank, bank_labels, test, test_labels, source.num_classes, seed=seed)
  if head:  # the head takes final_avg_pool (ft_proj_selector=0)
    logits = model.supervised_head(tf.constant(test), training=False)
    result['lineareval_while_pretraining_top_1'] = float(
        np.mean(np.argmax(logits.numpy(), 1) == test_labels))
  result['features_s'] = round(features_s, 1)
  result['num_train_features'], result['num_test'] = len(bank), len(test)
  return result


def evaluation_config(args):
  """The evaluator's Config: the pretrained architecture, eval settings."""
  return config_lib.Config(
      dataset=args.dataset, data_dir=args.data_dir,
      train_split=args.train_split, eval_split=args.eval_split,
      train_mode='pretrain', lineareval_while_pretraining=True,
      resnet_depth=args.resnet_depth, width_multiplier=args.width_multiplier,
      image_size=args.image_size, eval_batch_size=args.eval_batch_size,
      eval_steps=args.eval_steps, knn_bank_size=args.knn_bank_size).validate()


def evaluate_checkpoint(cfg, source, seed, checkpoint=None):
  """evaluate_encoder's results for a checkpoint, or (None) a random encoder.

  The random encoder is the architecture initialised under `seed`. A
  checkpoint may be ours or the original's: `checkpoints.restore_model`
  reads both and stops unless every encoder variable was restored.
  """
  # Python's, numpy's and TensorFlow's seeds: unseeded Keras initializers
  # draw their seeds from Python's `random`.
  keras.utils.set_random_seed(seed)
  model = model_lib.Model(source.num_classes, cfg)
  model(tf.zeros([1, cfg.image_size, cfg.image_size, 3]), training=False)
  if checkpoint:
    checkpoints.restore_model(model, checkpoint)
  return evaluate_encoder(cfg, source, model, seed, head=bool(checkpoint))


def main(argv=None):
  tf.get_logger().setLevel('ERROR')  # Keras deprecation notes
  args = parse_args(argv)
  model_dir = args.model_dir or tempfile.mkdtemp(prefix='simclr_learning_')
  start = time.time()
  command = pretrain_command(args, model_dir)
  print('pretraining: ' + shlex.join(command[1:]), file=sys.stderr,
        flush=True)
  code = subprocess.run(command, cwd=ROOT, env=console.user_environment(),
                        check=False).returncode
  if code:
    sys.exit(f'error: the pretraining (run.py) stopped with exit code {code}; '
             'its message is above.')
  pretrain_s = time.time() - start

  cfg = evaluation_config(args)
  source = data_lib.get_source(cfg.dataset, cfg.data_dir)
  num_train = source.num_examples(cfg.train_split)
  results = {
      'random': evaluate_checkpoint(cfg, source, args.seed),
      'pretrained': evaluate_checkpoint(cfg, source, args.seed,
                                        tf.train.latest_checkpoint(model_dir))}
  total_s = time.time() - start
  pairs = args.train_steps * args.train_batch_size
  line = {
      'bench': 'learning', 'dataset': args.dataset,
      'model': f'ResNet-{args.resnet_depth} width {args.width_multiplier} '
               f'at {args.image_size}px',
      'precision': args.precision, 'train_steps': args.train_steps,
      'train_batch_size': args.train_batch_size,
      'images_seen': pairs, 'views_seen': 2 * pairs,
      'epochs': round(pairs / num_train, 2),
      'pretrained': results['pretrained'], 'random': results['random'],
      'knn': {'k': cfg.knn_k, 'temperature': cfg.knn_temperature},
      'wall_s': {'pretrain': round(pretrain_s, 1),
                 'evaluate': round(total_s - pretrain_s, 1),
                 'total': round(total_s, 1)},
      # Over the whole run.py process: start-up and checkpoints included.
      'pretrain_images_per_s': round(pairs / pretrain_s, 1),
      'machine': dict(machine(), gpus=[
          d.name for d in tf.config.list_physical_devices('GPU')]),
      'model_dir': model_dir,
      'command': 'python ' + shlex.join(command[1:]).replace(str(ROOT) + '/',
                                                             ''),
  }
  print(json.dumps(line))


if __name__ == '__main__':
  main()
