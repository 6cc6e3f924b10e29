"""run.py end to end: the original README's commands, shrunk by overriding
flags, in every mode; restores, errors, export and reload."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import config as config_lib
import conftest
import data as data_lib
import data_util
import helpers
import model as model_lib
import runtime
import training

ROOT = conftest.ROOT
TFDS = conftest.SHARED / 'tfds'
# Appended to every README command: a tiny model and run on real CIFAR-10.
SHRINK = ['--train_steps=2', '--train_batch_size=8', '--eval_steps=1',
          '--eval_batch_size=8', '--resnet_depth=18', '--image_size=32',
          f'--data_dir={TFDS}', '--checkpoint_steps=1']


def run_cli(*args, check=True):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  proc = subprocess.run([sys.executable, str(ROOT / 'run.py'), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f'run.py failed ({proc.returncode}):\n'
                         f'{proc.stderr[-3000:]}')
  return proc


# The original README's CIFAR-10 commands, as written.
PRETRAIN = ['--train_mode=pretrain', '--train_batch_size=512',
            '--train_epochs=1000', '--learning_rate=1.0',
            '--weight_decay=1e-4', '--temperature=0.5', '--dataset=cifar10',
            '--image_size=32', '--eval_split=test', '--resnet_depth=18',
            '--use_blur=False', '--color_jitter_strength=0.5',
            '--use_tpu=False']
FINETUNE = ['--mode=train_then_eval', '--train_mode=finetune',
            '--fine_tune_after_block=4', '--zero_init_logits_layer=True',
            '--variable_schema=(?!global_step|(?:.*/|^)Momentum|head)',
            '--global_bn=False', '--optimizer=momentum', '--learning_rate=0.1',
            '--weight_decay=0.0', '--train_epochs=100',
            '--train_batch_size=512', '--warmup_epochs=0', '--dataset=cifar10',
            '--image_size=32', '--eval_split=test', '--resnet_depth=18',
            '--use_tpu=False']


def _pretrain_config(**overrides):
  """The Config of PRETRAIN + SHRINK (what the checkpoints here hold)."""
  return config_lib.Config(
      resnet_depth=18, image_size=32, train_batch_size=8, weight_decay=1e-4,
      learning_rate=1.0, temperature=0.5, use_blur=False,
      **overrides).validate()


def _fresh_training_state(cfg):
  """(model, optimizer, tf.train.Checkpoint) as runtime.train builds them, with
  the optimizer's slots created so a restore can be checked completely."""
  model = model_lib.Model(10, cfg)
  model(tf.zeros([1, 32, 32, 3]), training=False)
  optimizer = model_lib.build_optimizer(
      model_lib.WarmUpAndCosineDecay(1.0, 10000, cfg), cfg)
  optimizer._create_all_weights(model.trainable_variables)  # pylint: disable=protected-access
  checkpoint = tf.train.Checkpoint(model=model, global_step=optimizer.iterations,
                                   optimizer=optimizer)
  return model, optimizer, checkpoint


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  conftest.require(TFDS)
  model_dir = tmp_path_factory.mktemp('pretrain')
  proc = run_cli(*PRETRAIN, f'--model_dir={model_dir}',
                 '--mode=train_then_eval', *SHRINK)
  return model_dir, proc


def test_pretrain_writes_checkpoints_results_and_savedmodel(pretrained):
  model_dir, proc = pretrained
  assert (model_dir / 'ckpt-2.index').exists()
  result = json.loads((model_dir / 'result.json').read_text())
  assert result['global_step'] == 2
  # The head trained while pretraining, on the first 8 test images (one
  # eval step of 8), recomputed from the export with plain TensorFlow.
  source = data_lib.get_source('cifar10', str(TFDS))
  batch = next(iter(source.as_dataset('test').take(8).batch(8)))
  images = tf.map_fn(lambda image: data_util.preprocess_image(
      image, 32, 32, False, test_crop=False), batch['image'],
                     fn_output_signature=tf.float32)
  logits = tf.saved_model.load(str(model_dir / 'saved_model' / '2'))(
      images, trainable=False)['logits_sup'].numpy()
  assert result['eval/label_top_1_accuracy'] == pytest.approx(
      np.mean(np.argmax(logits, 1) == batch['label'].numpy()), abs=1e-6)
  assert json.loads((model_dir / 'result_2.json').read_text()) == result
  flags = json.loads((model_dir / 'flags.json').read_text())
  assert flags['temperature'] == 0.5 and flags['train_steps'] == 2
  # Written from the run's Config: its fields, nothing else.
  assert sorted(flags) == sorted(config_lib.Config.__dataclass_fields__)
  assert (model_dir / 'saved_model' / '2' / 'saved_model.pb').exists()
  assert 'step 2/2' in proc.stderr and 'images/s' in proc.stderr


def _model_entries(prefix):
  """{key: value} of a checkpoint's model variables (no optimizer slots)."""
  reader = tf.train.load_checkpoint(str(prefix))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if k.startswith('model/') and '.OPTIMIZER_SLOT' not in k}


def test_linear_evaluation_as_in_readme_leaves_the_encoder_unchanged(
    pretrained, tmp_path):
  """The README's linear evaluation (the original's command with the TF1
  protocol whose ~91% it quotes): after training, every encoder variable,
  batch-norm moving statistics included, is bit for bit the pretrained
  one; the classifier trained."""
  model_dir, _ = pretrained
  run_cli(*FINETUNE, '--linear_eval_protocol=tf1', f'--checkpoint={model_dir}',
          f'--model_dir={tmp_path}', *SHRINK)
  result = json.loads((tmp_path / 'result.json').read_text())
  assert result['global_step'] == 2
  before = _model_entries(model_dir / 'ckpt-2')
  after = _model_entries(tmp_path / 'ckpt-2')
  encoder = [k for k in after if k.startswith('model/resnet_model/')]
  # ResNet-18: 21 convolutions, each with a batch norm of 4 variables.
  assert len(encoder) == 105 and sum('moving_' in k for k in encoder) == 42
  for key in encoder:
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  head = [k for k in after if k.startswith('model/supervised_head/')]
  assert len(head) == 2 and all(np.abs(after[k]).max() > 0 for k in head)


# The README's fine-tuning commands as restores: what --checkpoint gives the
# model before the first step. The linear evaluation keeps encoder and
# projection head, the 1%/10% command too; both zero the classifier. With a
# schema that restores the classifier too, zero_init_logits_layer zeroes it
# after the restore.
@pytest.mark.parametrize('command', ['linear_eval', 'subset_finetune',
                                     'whole_checkpoint'])
def test_finetune_starts_from_the_checkpoint_with_a_zero_classifier(
    pretrained, tmp_path, command):
  model_dir, _ = pretrained
  flags = {'linear_eval': FINETUNE, 'subset_finetune': IMAGENET_FINETUNE,
           'whole_checkpoint': ['--variable_schema=.*',
                                '--fine_tune_after_block=-1']}
  overrides = dict(a[2:].split('=', 1) for a in flags[command]
                   if a.startswith(('--variable_schema', '--fine_tune_after',
                                    '--ft_proj_selector')))
  cfg = _pretrain_config(
      model_dir=str(tmp_path), train_mode='finetune',
      checkpoint=str(model_dir), zero_init_logits_layer=True,
      variable_schema=overrides['variable_schema'],
      fine_tune_after_block=int(overrides['fine_tune_after_block']),
      ft_proj_selector=int(overrides.get('ft_proj_selector', 0)))
  model, _, checkpoint = _fresh_training_state(cfg)
  runtime.restore_or_initialise(cfg, model, tf.train.CheckpointManager(
      checkpoint, str(tmp_path), max_to_keep=1))
  saved = _model_entries(model_dir / 'ckpt-2')
  ours = checkpoints.variables_by_key(tf.train.Checkpoint(model=model))
  kept = [k for k in ours if k.startswith(('model/resnet_model/',
                                           'model/_projection_head/'))]
  assert len(kept) == 105 + 14  # encoder; 3 projection layers (no BN beta in the last)
  for key in kept:
    np.testing.assert_array_equal(ours[key].numpy(),
                                  saved[key + checkpoints.SUFFIX], key)
  head = [k for k in ours if k.startswith('model/supervised_head/')]
  assert len(head) == 2
  for key in head:
    assert np.abs(saved[key + checkpoints.SUFFIX]).max() > 0
    np.testing.assert_array_equal(ours[key].numpy(), 0.)


def test_eval_mode_evaluates_the_latest_checkpoint(pretrained, tmp_path):
  model_dir, _ = pretrained
  proc = run_cli(*PRETRAIN, f'--model_dir={model_dir}', '--mode=eval',
                 *SHRINK)
  assert 'Evaluating' in proc.stderr and 'ckpt-2' in proc.stderr


def test_finished_run_asked_to_continue_does_nothing(pretrained):
  model_dir, _ = pretrained
  before = sorted(p.name for p in model_dir.iterdir())
  proc = run_cli(*PRETRAIN, f'--model_dir={model_dir}', '--mode=train',
                 *SHRINK)
  assert 'Training already complete at step 2' in proc.stderr
  assert sorted(p.name for p in model_dir.iterdir()
                if not p.name.startswith('events')) == [
                    n for n in before if not n.startswith('events')]


def test_finetune_without_checkpoint_says_so(tmp_path, caplog):
  cfg = _pretrain_config(model_dir=str(tmp_path), train_mode='finetune')
  model, _, checkpoint = _fresh_training_state(cfg)
  before = [v.numpy() for v in model.trainable_variables]
  runtime.restore_or_initialise(cfg, model, tf.train.CheckpointManager(
      checkpoint, str(tmp_path), max_to_keep=1))
  assert 'without --checkpoint: training from scratch' in caplog.text
  for old, variable in zip(before, model.trainable_variables):
    np.testing.assert_array_equal(old, variable.numpy())  # left as created


# The full list of bad inputs runs in process (test_bad_flags.py); these
# two go through the real command line.
@pytest.mark.parametrize('args,expected', [
    (['--checkpoint=/nonexistent/ckpt-1', '--train_mode=finetune'],
     '/nonexistent/ckpt-1'),
    (['--use_tpu=True'], 'use_tpu'),
])
def test_bad_input_stops_with_one_line(tmp_path, args, expected):
  conftest.require(TFDS)
  base = ['--dataset=cifar10', '--eval_split=test', '--use_tpu=False',
          f'--model_dir={tmp_path / "m"}', '--resnet_depth=18',
          '--image_size=32', f'--data_dir={TFDS}', '--train_steps=1']
  proc = run_cli(*base, *args, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last, last
  assert 'Traceback' not in proc.stderr


def test_exported_savedmodel_reloads_with_plain_tensorflow(pretrained,
                                                           tmp_path):
  """Fresh process, no project code: the released-format call gives the
  Keras model's outputs, the serving signature agrees, and a linear head
  trains on its features."""
  model_dir, _ = pretrained
  images = np.random.RandomState(0).uniform(size=(6, 32, 32, 3))
  np.save(tmp_path / 'images.npy', images.astype(np.float32))
  script = f"""
import numpy as np, tensorflow as tf
m = tf.saved_model.load({str(model_dir / 'saved_model' / '2')!r})
x = tf.constant(np.load({str(tmp_path / 'images.npy')!r}))
out = m(x, trainable=False)
np.savez({str(tmp_path / 'out.npz')!r}, **{{k: v.numpy() for k, v in out.items()}})
served = m.signatures['serving_default'](images=x)
print(float(np.abs(served['logits'].numpy() - out['logits_sup'].numpy()).max()))
print(float(np.abs(served['probabilities'].numpy().sum(1) - 1).max()))
with tf.GradientTape() as tape:
  loss = tf.reduce_sum(m(x, trainable=True)['logits_sup'])
grads = tape.gradient(loss, m.trainable_variables_list)
print(len(grads), sum(g is not None for g in grads))
features = out['final_avg_pool']
features = (features - tf.reduce_mean(features, 0)) / (tf.math.reduce_std(features, 0) + 1e-6)
labels = tf.constant([0, 1, 2, 0, 1, 2])
head = tf.Variable(tf.zeros([features.shape[1], 3]))
losses = []
for _ in range(30):
  with tf.GradientTape() as tape:
    logits = tf.matmul(features, head)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
  head.assign_sub(0.5 * tape.gradient(loss, head))
  losses.append(float(loss))
print(losses[0], losses[-1])
"""
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert float(lines[0]) < 1e-5 and float(lines[1]) < 1e-5
  total, with_grad = map(int, lines[2].split())
  assert total == 73 and with_grad >= 70
  first, last = map(float, lines[3].split())
  assert last < 0.5 * first

  # The same images through this project's model restored from ckpt-2.
  flags = json.loads((model_dir / 'flags.json').read_text())
  cfg = helpers.config_from_flags(flags)
  model = model_lib.Model(10, cfg)
  x = tf.constant(images, tf.float32)
  model.endpoints(x, training=False)
  checkpoints.restore_model(model, str(model_dir / 'ckpt-2'))
  ours = model.endpoints(x, training=False)
  saved = np.load(tmp_path / 'out.npz')
  assert sorted(saved.files) == sorted(ours)
  for name, value in ours.items():
    assert helpers.max_rel_diff(value.numpy(), saved[name]) < 1e-5, name


def test_finetune_from_exported_savedmodel(pretrained, tmp_path):
  model_dir, _ = pretrained
  proc = run_cli(*FINETUNE, f'--checkpoint={model_dir / "saved_model" / "2"}',
                 f'--model_dir={tmp_path}', '--mode=train', *SHRINK)
  assert 'restored 119 variables' in proc.stderr, proc.stderr[-2000:]
  assert (tmp_path / 'ckpt-2.index').exists()


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
  """SIGKILL after a checkpoint: the rerun resumes there, with the saved
  weights and optimizer slots, and finishes."""
  conftest.require(TFDS)
  args = [str(ROOT / 'run.py'), *PRETRAIN, f'--model_dir={tmp_path}',
          '--mode=train', *SHRINK, '--train_steps=40']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (tmp_path / 'ckpt-2.index').exists():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  latest = tf.train.latest_checkpoint(str(tmp_path))
  step = int(latest.rsplit('-', 1)[1])
  assert 2 <= step < 40

  # The saved state restores completely into a fresh model and optimizer.
  _, optimizer, ckpt = _fresh_training_state(_pretrain_config())
  ckpt.restore(latest).assert_consumed()
  reader = tf.train.load_checkpoint(latest)
  restored = checkpoints.variables_by_key(ckpt)
  assert int(optimizer.iterations) == step
  for key, variable in restored.items():
    if key != 'save_counter':
      np.testing.assert_array_equal(
          variable.numpy(), reader.get_tensor(key + checkpoints.SUFFIX), key)
  assert any('.OPTIMIZER_SLOT' in k for k in restored)

  # The killed run's lock claim stays behind; its process is gone, so the
  # rerun takes it over (model_dir_lock).
  assert len(list(tmp_path.glob('.run_lock.*.json'))) == 1
  resumed = run_cli(*PRETRAIN, f'--model_dir={tmp_path}', '--mode=train',
                    *SHRINK, f'--train_steps={step + 2}')
  assert (f'Taking over the lock of --model_dir={tmp_path} from an earlier '
          f'run (host {socket.gethostname()}, pid {proc.pid}, started '
          in resumed.stderr), resumed.stderr[-2000:]
  assert 'its process is gone' in resumed.stderr
  assert not list(tmp_path.glob('.run_lock.*'))
  assert f'Resuming from {latest}' in resumed.stderr
  assert f'step {step + 2}/{step + 2}' in resumed.stderr
  assert (tmp_path / f'ckpt-{step + 2}.index').exists()
  # --mode=train exports the final model too.
  assert (tmp_path / 'saved_model' / str(step + 2) / 'saved_model.pb').exists()


IMAGENET_PRETRAIN = ['--train_mode=pretrain', '--train_batch_size=4096',
                     '--train_epochs=100', '--temperature=0.1',
                     '--learning_rate=0.075', '--learning_rate_scaling=sqrt',
                     '--weight_decay=1e-4', '--dataset=imagenet2012',
                     '--image_size=224', '--eval_split=validation',
                     '--use_tpu=True', '--train_summary_steps=0']
# The original README's 1% command, as written.
IMAGENET_FINETUNE = [
    '--mode=train_then_eval', '--train_mode=finetune',
    '--fine_tune_after_block=-1', '--zero_init_logits_layer=True',
    '--variable_schema=(?!global_step|(?:.*/|^)Momentum|head_supervised)',
    '--global_bn=True', '--optimizer=lars', '--learning_rate=0.005',
    '--learning_rate_scaling=sqrt', '--weight_decay=0', '--train_epochs=60',
    '--train_batch_size=1024', '--warmup_epochs=0',
    '--dataset=imagenet2012_subset/1pct', '--image_size=224',
    '--eval_split=validation', '--use_tpu=True', '--train_summary_steps=0',
    '--num_proj_layers=3', '--ft_proj_selector=1']
# No ImageNet and no TPU here: the same commands on CIFAR-10 and the CPU.
OFFLINE = ['--dataset=cifar10', '--eval_split=test', '--use_tpu=False']


def test_imagenet_readme_commands_run_shrunk(pretrained, tmp_path):
  model_dir, _ = pretrained
  run_cli(*IMAGENET_PRETRAIN, f'--model_dir={tmp_path / "pre"}',
          '--mode=train', *SHRINK, *OFFLINE)
  assert (tmp_path / 'pre' / 'ckpt-2.index').exists()
  proc = run_cli(*IMAGENET_FINETUNE, f'--model_dir={tmp_path / "ft"}',
                 f'--checkpoint={model_dir}', *SHRINK, *OFFLINE)
  assert 'restored 119 variables' in proc.stderr
  assert (tmp_path / 'ft' / 'result_2.json').exists()


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
  """Preemption: SIGTERM mid-run saves the current step and exits cleanly."""
  conftest.require(TFDS)
  log = tmp_path / 'log.txt'
  model_dir = tmp_path / 'm'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  with open(log, 'w') as out:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / 'run.py'), *PRETRAIN,
         f'--model_dir={model_dir}', '--mode=train', *SHRINK,
         '--train_steps=1000', '--checkpoint_steps=1000',
         '--train_summary_steps=1'],
        cwd=ROOT, env=env, stdout=out, stderr=out)
    deadline = time.time() + 300
    while 'step 1/1000' not in log.read_text():
      assert proc.poll() is None and time.time() < deadline
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
  text = log.read_text()
  assert 'Stopped by signal 15' in text
  step = int(tf.train.latest_checkpoint(str(model_dir)).rsplit('-', 1)[1])
  assert 1 <= step < 1000
  assert not (model_dir / 'saved_model').exists()


def test_divergence_stops_without_saving_broken_weights(tmp_path):
  conftest.require(TFDS)
  proc = run_cli(*PRETRAIN, f'--model_dir={tmp_path}', '--mode=train',
                 *SHRINK, '--train_steps=4', '--learning_rate=1e35',
                 '--warmup_epochs=0', check=False)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: non-finite loss by step 2')
  assert f'last good checkpoint: {tmp_path}/ckpt-1' in last
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-1')


@pytest.mark.parametrize('damage', ['truncated_data', 'state_points_nowhere'])
def test_damaged_latest_checkpoint_stops_or_falls_back(pretrained, tmp_path,
                                                       damage, caplog):
  # run.py's own resume step, in process (the command line's one-line error
  # for a corrupt checkpoint is test_truncated_checkpoint_given_to_finetune).
  # On absl's own logger: a run.main earlier in this process (flags parsed,
  # default verbosity) leaves it at WARNING.
  caplog.set_level('INFO', logger='absl')
  model_dir, _ = pretrained
  work = tmp_path / 'm'
  shutil.copytree(model_dir, work)
  if damage == 'truncated_data':
    data = work / 'ckpt-2.data-00000-of-00001'
    data.write_bytes(data.read_bytes()[:1000])
    named = 'ckpt-2'
  else:
    state = work / 'checkpoint'
    state.write_text(state.read_text().replace('ckpt-2', 'ckpt-9'))
    named = 'ckpt-9'
  cfg = _pretrain_config(model_dir=str(work))
  _, optimizer, checkpoint = _fresh_training_state(cfg)
  manager = tf.train.CheckpointManager(checkpoint, str(work), max_to_keep=5)
  with pytest.raises(checkpoints.CheckpointError) as error:
    runtime.restore_or_initialise(cfg, checkpoint.model, manager)
  assert str(error.value).startswith(f'cannot resume from {work}/{named}')
  assert '--resume_fallback' in str(error.value)

  _, optimizer, checkpoint = _fresh_training_state(
      cfg.replace(resume_fallback=True))
  manager = tf.train.CheckpointManager(checkpoint, str(work), max_to_keep=5)
  runtime.restore_or_initialise(cfg.replace(resume_fallback=True),
                            checkpoint.model, manager)
  assert f'Resuming from {work}/ckpt-1' in caplog.text
  assert 'falling back to the previous one' in caplog.text
  assert int(optimizer.iterations) == 1  # ckpt-1's step, not a fresh 0
  reader = tf.train.load_checkpoint(str(work / 'ckpt-1'))
  for key, variable in checkpoints.variables_by_key(checkpoint).items():
    if key != 'save_counter':
      np.testing.assert_array_equal(
          variable.numpy(), reader.get_tensor(key + checkpoints.SUFFIX), key)


def test_truncated_checkpoint_given_to_finetune_is_named(pretrained,
                                                        tmp_path):
  model_dir, _ = pretrained
  for name in ('ckpt-2.index', 'ckpt-2.data-00000-of-00001'):
    shutil.copy(model_dir / name, tmp_path / name)
  data = tmp_path / 'ckpt-2.data-00000-of-00001'
  data.write_bytes(data.read_bytes()[:1000])
  proc = run_cli(*FINETUNE, f'--checkpoint={tmp_path}/ckpt-2',
                 f'--model_dir={tmp_path / "ft"}', *SHRINK, check=False)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert f'{tmp_path}/ckpt-2' in last and 'corrupt' in last, last


def test_loop_runs_a_checkpoint_interval_with_summaries_inside(
    shapes10_dir, tmp_path, monkeypatch, caplog):
  """As the original, one call of the training loop runs up to the next
  checkpoint (--train_summary_steps does not shorten it); summaries and
  progress lines come every train_summary_steps steps inside the call; the
  run stops exactly at train_steps (the original finishes its last loop)."""
  caplog.set_level('INFO', logger='absl')
  calls = []
  original = runtime.make_train_loop

  def recording(*args, **kwargs):
    loop = original(*args, **kwargs)

    def call(iterator, steps):
      calls.append(int(steps))
      return loop(iterator, steps)
    return call

  monkeypatch.setattr(runtime, 'make_train_loop', recording)
  cfg = config_lib.Config(
      dataset='shapes10', data_dir=str(shapes10_dir), resnet_depth=18,
      width_multiplier=0.125, image_size=32, train_batch_size=8,
      train_steps=7, checkpoint_steps=4, train_summary_steps=2,
      use_blur=False, mode='train', model_dir=str(tmp_path),
      use_tpu=False).validate()
  training.run(cfg)
  assert calls == [4, 3]
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-7')
  lines = [l for l in caplog.text.splitlines() if ' | lr=' in l]
  assert [l.split('step ')[1].split(' ')[0] for l in lines] == [
      '2/7', '4/7', '6/7', '7/7']
  steps = {}
  for event_file in tmp_path.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
      for value in event.summary.value:
        steps.setdefault(value.tag, []).append(event.step)
  for tag in ('train/total_loss', 'train/contrast_loss', 'learning_rate'):
    assert sorted(steps[tag]) == [2, 4, 6, 7], tag
  assert sorted(steps['augmented_views']) == [2, 4, 6]
