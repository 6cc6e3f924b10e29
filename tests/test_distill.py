"""distill.py: the SimCLRv2 distillation loss against numpy, and a short
`run.py --train_mode=distill` run from a small trained teacher on shapes10."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import config as config_lib
import conftest
import data as data_lib
import distill
import model as model_lib

ROOT = conftest.ROOT


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(teacher, student, tau, labels=None, alpha=1.0):
  """Eq. 2/3 of the SimCLRv2 paper in float64 numpy, mean over the batch."""
  p_teacher = np.exp(_log_softmax(teacher / tau))
  soft = -(p_teacher * _log_softmax(student / tau)).sum(-1).mean()
  if labels is None:
    return alpha * soft
  hard = -(labels * _log_softmax(student)).sum(-1).mean()
  return alpha * soft + (1 - alpha) * hard


@pytest.mark.parametrize('tau', [1.0, 0.5, 2.0, 4.0])
def test_distillation_loss_matches_numpy(tau):
  rng = np.random.RandomState(0)
  teacher = rng.normal(0, 3, (6, 5))
  student = rng.normal(0, 2, (6, 5))
  got = distill.distillation_loss(tf.constant(teacher, tf.float32),
                                  tf.constant(student, tf.float32), tau)
  np.testing.assert_allclose(float(got), _reference(teacher, student, tau),
                             rtol=1e-5)


def test_temperature_softens_the_teacher():
  # A confident teacher: at tau=1 the loss is close to the student's hard
  # cross entropy with the teacher's argmax; at tau=4 the target is flatter
  # and the loss is near log(C) for a uniform student.
  teacher = np.array([[8., 0., 0., 0.]])
  student = np.zeros((1, 4))
  at_1 = float(distill.distillation_loss(teacher, student, 1.0))
  at_4 = float(distill.distillation_loss(teacher, student, 4.0))
  np.testing.assert_allclose(at_1, np.log(4), rtol=1e-6)  # uniform student
  np.testing.assert_allclose(at_4, np.log(4), rtol=1e-6)
  student = np.array([[4., 0., 0., 0.]])
  sharp = float(distill.distillation_loss(teacher, student, 1.0))
  soft = float(distill.distillation_loss(teacher, student, 4.0))
  np.testing.assert_allclose(sharp, _reference(teacher, student, 1.0),
                             rtol=1e-5)
  np.testing.assert_allclose(soft, _reference(teacher, student, 4.0),
                             rtol=1e-5)
  assert sharp < 0.1 < soft  # the softened target is not the argmax


@pytest.mark.parametrize('alpha,tau', [(0.3, 1.0), (0.5, 2.0), (0.0, 3.0)])
def test_labelled_term_weighs_one_minus_alpha(alpha, tau):
  rng = np.random.RandomState(1)
  teacher = rng.normal(0, 2, (8, 10))
  student = rng.normal(0, 2, (8, 10))
  labels = np.eye(10)[rng.randint(0, 10, 8)]
  got = distill.distillation_loss(
      tf.constant(teacher, tf.float32), tf.constant(student, tf.float32),
      tau, labels=tf.constant(labels, tf.float32), alpha=alpha)
  np.testing.assert_allclose(
      float(got), _reference(teacher, student, tau, labels, alpha), rtol=1e-5)


def test_gradient_reaches_the_student_only():
  teacher = tf.Variable([[1., 2., 3.]])
  student = tf.Variable([[0., 0., 1.]])
  tau = 2.0
  with tf.GradientTape() as tape:
    loss = distill.distillation_loss(teacher, student, tau)
  g_teacher, g_student = tape.gradient(loss, [teacher, student])
  assert g_teacher is None
  # d/ds of -sum p_T log softmax(s / tau) = (softmax(s / tau) - p_T) / tau.
  p_t = np.exp(_log_softmax(np.array([[1., 2., 3.]]) / tau))
  p_s = np.exp(_log_softmax(np.array([[0., 0., 1.]]) / tau))
  np.testing.assert_allclose(g_student.numpy(), (p_s - p_t) / tau, rtol=1e-5)


@pytest.mark.parametrize('kwargs,expected', [
    (dict(temperature=0.), 'temperature'),
    (dict(alpha=1.5), 'alpha'),
    (dict(alpha=0.5), 'labels'),
])
def test_bad_loss_arguments(kwargs, expected):
  with pytest.raises(ValueError, match=expected):
    distill.distillation_loss(tf.zeros([1, 3]), tf.zeros([1, 3]), **kwargs)


def test_bad_teacher_is_one_line(tmp_path, shapes10_dir):
  cfg = config_lib.Config(model_dir=str(tmp_path / 'm'), dataset='shapes10',
                          data_dir=str(shapes10_dir), eval_split='test',
                          use_tpu=False, train_mode='distill',
                          teacher=str(tmp_path))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'--teacher=.*not a SavedModel'):
    distill.load_teacher(str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match='distill_temperature'):
    distill.distill(cfg.replace(distill_temperature=-1.))
  with pytest.raises(config_lib.ConfigError, match='needs --teacher'):
    distill.distill(cfg.replace(teacher=None))
  with pytest.raises(config_lib.ConfigError, match='model_dir'):
    distill.distill(cfg.replace(model_dir=None))


# The command line's plumbing: a ResNet-18 student at 1/8 width, 40 steps
# from the tiny teacher, checkpoints, progress, evaluation on 500 test images,
# result.json and the exported SavedModel. That the student learns is checked
# by tests/test_notebooks.py::test_distillation, which trains with the same
# distill.make_distill_step and scores with the same distill.evaluate (150
# steps here gave agreement 0.70-0.74 vs the teacher's commonest-class share
# 0.28-0.32, student accuracy 0.49-0.51, in 60-80 s; 40 steps take ~25 s).
DISTILL_ARGS = ['--dataset=shapes10', '--eval_split=test', '--use_tpu=False',
                '--resnet_depth=18', '--width_multiplier=0.125',
                '--image_size=32', '--train_batch_size=64',
                '--train_steps=40', '--optimizer=adam',
                '--learning_rate=0.04', '--weight_decay=0',
                '--warmup_epochs=0', '--eval_batch_size=500',
                '--eval_steps=1', '--checkpoint_steps=20',
                '--train_summary_steps=10', '--global_bn=False']


@pytest.fixture(scope='module')
def distilled(tiny_teacher, shapes10_dir, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp('student')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'run.py'), '--train_mode=distill',
       f'--teacher={tiny_teacher}',
       f'--model_dir={model_dir}', f'--data_dir={shapes10_dir}',
       *DISTILL_ARGS], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return model_dir, proc


def test_cli_reports_the_evaluation_it_wrote(distilled):
  model_dir, proc = distilled
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert printed == json.loads((model_dir / 'result.json').read_text())
  print(printed)  # the numbers, for -s
  assert printed['global_step'] == 40 and printed['num_examples'] == 500
  assert printed['teacher_top_1_accuracy'] > 0.5  # the teacher, scored
  for key in ('agreement', 'teacher_class_frequency_max',
              'student_top_1_accuracy'):
    assert 0 <= printed[key] <= 1, key
  for step in (10, 20, 30, 40):
    assert f'step {step}/40' in proc.stderr
  assert 'distill_loss=' in proc.stderr


def test_cli_writes_student_checkpoint_and_savedmodel(distilled):
  model_dir, _ = distilled
  assert (model_dir / 'ckpt-20.index').exists()
  assert (model_dir / 'ckpt-40.index').exists()
  cfg = config_lib.Config(resnet_depth=18, width_multiplier=0.125,
                          image_size=32, train_mode='finetune')
  student = model_lib.Model(10, cfg)
  student(tf.zeros([1, 32, 32, 3]), training=False)
  # The keys run.py writes: `run.py --checkpoint=<model_dir>` starts from it.
  report = checkpoints.restore_model(student, str(model_dir))
  assert not report.missing
  images = tf.random.stateless_uniform([3, 32, 32, 3], seed=[1, 2])
  loaded = tf.saved_model.load(str(model_dir / 'saved_model' / '40'))
  _, logits = student(images, training=False)
  np.testing.assert_allclose(loaded(images, trainable=False)['logits_sup'],
                             logits, atol=1e-4)


def test_teacher_of_other_classes_trains_on_unlabelled_batches(shapes10_dir):
  """A teacher of other classes than the dataset's: the training pipeline
  (seeded, as run.py builds it) reads the source with zero one-hot labels of
  the student's width."""
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  relabelled = distill._Relabelled(source, 5)  # pylint: disable=protected-access
  cfg = config_lib.Config(dataset='shapes10', image_size=32, seed=3,
                          train_mode='finetune')
  images, labels = next(iter(
      data_lib.build_input_fn(relabelled, 8, True, cfg)()))
  assert images.shape == [8, 32, 32, 3]
  np.testing.assert_array_equal(labels['labels'], np.zeros([8, 5]))
