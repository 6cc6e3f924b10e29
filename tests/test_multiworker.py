"""Two run.py worker processes (MultiWorkerMirroredStrategy over 127.0.0.1,
CPU) train like one process with two replicas; the chief alone writes to
model_dir; killing a worker stops the other with one line, and restarting
both resumes from the last checkpoint.

One scenario serves every test (each launch of two TensorFlow processes costs
tens of seconds on 2 cores): launch A trains from a fixed initial checkpoint
with --seed until the chief has saved ckpt-2, then worker 1 is SIGKILLed;
launch B is the same command, which resumes and finishes at step 4.

What the weight comparison proves: with --seed, input pipeline w of 2 is a
function of (seed, w, start step), so the test rebuilds both workers'
pipelines in process and feeds pipeline w to replica w of a MirroredStrategy
over 2 logical CPUs (`training.make_train_step`, the step run.py uses). Equal
weights then mean that the cross-process all-reduce, synchronised batch norm,
cross-replica negatives, checkpoint and restore of the two-process run do
what one process with two replicas does on the same per-replica batches.
(One process with two replicas equals one device: test_distributed.py.)
"""
import json
import os
import re
import shutil
import signal

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

import checkpoints
from cluster import assert_both_resumed_and_finished
from cluster import Cluster, kill_and_restart, stop_all, wait_for
import conftest
import config as config_lib
import data as data_lib
import helpers
import model as model_lib
import run
import runtime
import training

ROOT = conftest.ROOT
STEPS, CHECKPOINT_STEPS, SEED = 4, 2, 3
# Flag values shared by run.py and the in-process reference.
SETTINGS = dict(train_mode='pretrain', dataset='shapes10', resnet_depth=18,
                image_size=32, train_batch_size=8, train_steps=STEPS,
                checkpoint_steps=CHECKPOINT_STEPS, learning_rate=1.0,
                weight_decay=1e-4, temperature=0.5, warmup_epochs=0,
                use_blur=False, color_jitter_strength=0.5, seed=SEED,
                use_tpu=False)
NUM_TRAIN = 5000  # shapes10's train split: the learning-rate schedule's N
LOSSES = ('total_loss', 'contrast_loss', 'supervised_loss')


def contexts(pipelines=2):
  return [tf.distribute.InputContext(pipelines, w, 2) for w in range(pipelines)]


def test_each_worker_reads_its_own_half_of_a_one_file_split(shapes10_dir):
  """shapes10 is one file per split, which TFDS cannot share out by file:
  each input pipeline reads an even slice of the examples instead."""
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  halves = [{ex['image'].numpy().tobytes() for ex in source.as_dataset(
      'train', shuffle_files=True, input_context=ctx)} for ctx in contexts()]
  assert [len(h) for h in halves] == [2500, 2500]
  assert not halves[0] & halves[1]


def test_eval_over_two_workers_counts_every_example_once(shapes10_dir):
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  cfg = config_lib.Config(train_mode='finetune', dataset='shapes10',
                          image_size=32, eval_split='test')
  input_fn = data_lib.build_input_fn(source, 48, False, cfg, num_replicas=2)
  steps = data_lib.eval_steps(1000, 48, 2, 2)
  masks = [np.concatenate([labels['mask'].numpy() for _, labels in
                           input_fn(ctx)]) for ctx in contexts()]
  assert [len(m) for m in masks] == [steps * 24] * 2
  assert sum(m.sum() for m in masks) == 1000


@pytest.mark.parametrize('batched', [True, False])
def test_seeded_pipelines_repeat_and_resume_with_new_batches(shapes10_dir,
                                                             batched):
  source = data_lib.get_source('shapes10', str(shapes10_dir))
  cfg = config_lib.Config(dataset='shapes10', image_size=32, seed=SEED,
                          color_jitter_strength=0.5,
                          batched_augmentation=batched)

  def first(cfg, ctx):
    fn = data_lib.build_input_fn(source, 8, True, cfg, num_replicas=2)
    return next(iter(fn(ctx)))[0].numpy()

  ctx0, ctx1 = contexts()
  tf.random.set_seed(SEED)  # the global seed run.py sets with --seed
  try:
    batch = first(cfg, ctx0)
    np.testing.assert_array_equal(first(cfg, ctx0), batch)
    assert np.abs(first(cfg, ctx1) - batch).max() > 0.1
    resumed = cfg.replace(seed=data_lib.resumed_seed(SEED, 2))
    assert np.abs(first(resumed, ctx0) - batch).max() > 0.1
  finally:
    tf.random.set_seed(None)
  assert data_lib.resumed_seed(SEED, 0) == SEED
  assert data_lib.resumed_seed(None, 2) is None


# The text of the error TensorFlow 2.21 gave the chief when worker 1 was
# killed (abridged: the node's call stack is left out).
LOST = """Graph execution error:

Detected at node while/resnet/block_group1/residual_block/batch_norm_relu_2/sync_batch_normalization_2/moments/CollectiveReduceV2_1 defined at (most recent call last):
  File "run.py", line 650, in <module>

Collective ops is aborted by: recvmsg:Connection reset by peer
Additional GRPC error information from remote target /job:worker/replica:0/task:1 while calling /tensorflow.WorkerService/RecvBuf:
:UNKNOWN:Error received from peer  {grpc_message:"recvmsg:Connection reset by peer", grpc_status:14}
The error could be from a previous operation. Restart your program to reset.
\t [[{{node while/resnet/block_group1/residual_block/batch_norm_relu_2/sync_batch_normalization_2/moments/CollectiveReduceV2_1}}]] [Op:__inference_train_loop_22755]"""
TWO_WORKERS = json.dumps({'cluster': {'worker': ['127.0.0.1:1', '127.0.0.1:2']},
                          'task': {'type': 'worker', 'index': 0}})


def main_exit(argv, capsys):
  """Runs run.py's main in process: (exit code, last line of stderr)."""
  code = helpers.run_main_exit_code(argv)
  return code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize('tf_config,args,expected', [
    (TWO_WORKERS, ['--mode=eval'], '--mode=eval with several workers'),
    ('{"cluster": ', [], 'TF_CONFIG is not valid JSON'),
    ('', ['--seed=-1'], 'seed=-1'),
])
def test_bad_cluster_input_stops_before_any_work(
    tmp_path, capsys, monkeypatch, shapes10_dir, tf_config, args, expected):
  monkeypatch.setenv('TF_CONFIG', tf_config)
  monkeypatch.setattr(runtime, 'build_model', lambda *a: pytest.fail('built'))
  code, last = main_exit(['--use_tpu=False', '--dataset=shapes10',
                          f'--data_dir={shapes10_dir}', '--eval_split=test',
                          f'--model_dir={tmp_path}', *args], capsys)
  assert code == 2 and last.startswith('error: ') and expected in last, last


def test_lost_worker_is_one_line_only_in_a_cluster(tmp_path, capsys,
                                                   monkeypatch):
  def lost(cfg):
    raise tf.errors.UnavailableError(None, None, LOST)
  monkeypatch.setattr(training, 'run', lost)
  monkeypatch.setenv('TF_CONFIG', TWO_WORKERS)
  code, last = main_exit([f'--model_dir={tmp_path}'], capsys)
  assert code == 2
  assert last == (
      'error: lost contact with /job:worker/replica:0/task:1 '
      '(UnavailableError: Collective ops is aborted by: recvmsg:Connection '
      'reset by peer); restart every worker with the same command: training '
      f'resumes from the last checkpoint in --model_dir={tmp_path}.')
  # In one process the same error is not about workers: it is raised.
  monkeypatch.delenv('TF_CONFIG')
  flags.FLAGS(['run.py', f'--model_dir={tmp_path}'])
  try:
    with pytest.raises(tf.errors.UnavailableError):
      run.main(['run.py'])
  finally:
    flags.FLAGS.unparse_flags()


def test_lost_worker_named_from_the_heartbeat_error():
  """The coordination service's wording (a worker stopped sending
  heartbeats) names the lost task on the line after its first."""
  text = ('Collective ops is aborted by: Error reported from '
          '/job:worker/task:1: The following tasks are unhealthy (stopped '
          'sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks '
          'have crashed.')
  line = runtime.lost_worker_message(
      tf.errors.UnavailableError(None, None, text), '/m')
  assert line.startswith('lost contact with /job:worker/replica:0/task:1 '
                         '(UnavailableError: Collective ops is aborted by: '
                         'Error reported from /job:worker/task:1: The '
                         'following tasks are unhealthy')


@pytest.fixture(scope='module')
def scenario(tmp_path_factory, shapes10_dir):
  tmp = tmp_path_factory.mktemp('multiworker')
  model_dir = tmp / 'model'
  cfg = config_lib.Config(data_dir=str(shapes10_dir), **SETTINGS)
  # Both setups start from these weights.
  init = model_lib.Model(10, cfg)
  init(tf.zeros([1, 32, 32, 3]), training=False)
  init_path = tf.train.Checkpoint(model=init).write(str(tmp / 'init' / 'w'))
  args = [f'--{k}={v}' for k, v in SETTINGS.items()] + [
      f'--data_dir={shapes10_dir}', f'--model_dir={model_dir}',
      f'--checkpoint={init_path}', '--train_summary_steps=1', '--mode=train']
  cluster = Cluster(tmp, args)
  return dict(cfg=cfg, cluster=cluster, model_dir=model_dir,
              init_path=init_path, **kill_and_restart(cluster, model_dir))


def test_killing_a_worker_stops_the_other_with_one_line(scenario):
  log = scenario['cluster'].log('a', 0)
  assert scenario['chief_rc'] == 2, log[-3000:]
  last = log.strip().splitlines()[-1]
  assert last.startswith('error: lost contact with '
                         '/job:worker/replica:0/task:1 ('), last
  assert 'restart every worker with the same command' in last
  assert str(scenario['model_dir']) in last
  assert 'Traceback' not in log
  print(f'chief stopped {scenario["chief_exit_s"]:.1f} s after the kill; '
        f'both launches took {scenario["seconds"]:.0f} s')
  # Measured: 2 to 13 s (the next collective fails at once: connection
  # reset); the bound only says it does not hang.
  assert scenario['chief_exit_s'] < 90


def test_restart_resumes_from_the_last_checkpoint_and_finishes(scenario):
  model_dir = scenario['model_dir']
  assert_both_resumed_and_finished(scenario['cluster'], model_dir,
                                   scenario['resumed_at'], scenario['rcs'],
                                   STEPS)
  assert tf.train.latest_checkpoint(str(model_dir)).endswith('ckpt-4')


def test_only_the_chief_writes_to_model_dir(scenario):
  cluster, model_dir = scenario['cluster'], scenario['model_dir']
  saved = {f'ckpt-{n}.{ext}' for n in range(2, STEPS + 1, 2)
           for ext in ('index', 'data-00000-of-00001')}
  events = [n for n in os.listdir(model_dir) if n.startswith('events.')]
  # One summary file per launch of the chief, none from worker 1.
  assert len(events) == 2
  assert set(os.listdir(model_dir)) == saved | {
      'checkpoint', 'saved_model', *events}
  assert os.listdir(model_dir / 'saved_model') == [str(STEPS)]
  # Worker 1 saved (and exported) to a temporary directory of its own,
  # removed when it finished; the chief made none.
  log = cluster.log('b', 1)
  temp = re.search(r'this worker saves to (\S+) \(removed', log).group(1)
  assert temp.startswith(str(cluster.tmp / 'b_tmp1'))
  assert 'Exported SavedModel to ' + temp in log
  assert not os.path.exists(temp) and not os.listdir(cluster.tmp / 'b_tmp1')
  assert 'this worker saves to' not in cluster.log('b', 0)
  # Each worker reads its own half of the data, 8 / 2 per replica.
  for task in (0, 1):
    assert (f"train input pipeline {task + 1}/2: shapes10/2.0.0 split "
            "'train', 4 per replica") in cluster.log('b', task)


def logged_losses(log):
  """{step: {loss name: value}} from the progress lines of a log."""
  found = {}
  for match in re.finditer(r'step (\d+)/\d+ \|[^|]*\|[^|]*\| ([^|\n]*)',
                           log):
    terms = dict(kv.split('=') for kv in match.group(2).split())
    found[int(match.group(1))] = {k: float(terms[k]) for k in LOSSES}
  return found


def reference_run(cfg, init_path, strategy, segments):
  """Loss terms per step and [{key: value}] at the start and after each
  segment, training on 2 replicas in this process with pipeline w of 2
  feeding replica w.

  segments: [(start_step, steps)]: the pipelines restart at each start_step
  as run.py's do when it resumes there.
  """
  source = data_lib.get_source(cfg.dataset, cfg.data_dir)
  # run.py sets the global seed (keras.utils.set_random_seed); tf.data's
  # op seeds are combined with it.
  tf.random.set_seed(cfg.seed)
  try:
    with strategy.scope():
      model = model_lib.Model(10, cfg)
      model(tf.zeros([1, 32, 32, 3]), training=False)
      optimizer = model_lib.build_optimizer(
          model_lib.WarmUpAndCosineDecay(cfg.learning_rate, NUM_TRAIN, cfg),
          cfg)
      ckpt = tf.train.Checkpoint(model=model, global_step=optimizer.iterations,
                                 optimizer=optimizer)
      tf.train.Checkpoint(model=model).read(
          init_path).assert_existing_objects_matched()
    step_fn = training.make_train_step(model, optimizer, cfg, strategy)

    def state():
      return {k: v.numpy() for k, v in
              checkpoints.variables_by_key(ckpt).items()
              if v.dtype.is_floating and k != 'save_counter'}

    @tf.function
    def train_step(images, labels):
      return strategy.run(step_fn, (images, labels))

    losses, states = {}, [state()]
    for start, steps in segments:
      seg_cfg = cfg.replace(seed=data_lib.resumed_seed(cfg.seed, start))
      input_fn = data_lib.build_input_fn(source, cfg.train_batch_size, True,
                                         seg_cfg, num_replicas=2)
      pipelines = [iter(input_fn(tf.distribute.InputContext(2, w, 2)))
                   for w in range(2)]
      for step in range(start + 1, start + steps + 1):
        batches = [next(p) for p in pipelines]
        images = strategy.experimental_distribute_values_from_function(
            lambda ctx: batches[ctx.replica_id_in_sync_group][0])
        labels = strategy.experimental_distribute_values_from_function(
            lambda ctx: batches[ctx.replica_id_in_sync_group][1]['labels'])
        terms = train_step(images, labels)
        losses[step] = {k: float(np.mean([
            t.numpy() for t in strategy.experimental_local_results(terms[k])]))
                        for k in LOSSES}
      states.append(state())
  finally:
    tf.random.set_seed(None)
  return losses, states


def test_workers_train_like_one_process_with_two_replicas(scenario,
                                                          mirrored2):
  cluster, model_dir = scenario['cluster'], scenario['model_dir']
  step = scenario['resumed_at']
  losses, states = reference_run(scenario['cfg'], scenario['init_path'],
                                 mirrored2,
                                 [(0, step), (step, STEPS - step)])
  # The losses both workers print are means over both (the same line on
  # each) and those of the two replicas here.
  for name in ('a', 'b'):
    chief = logged_losses(cluster.log(name, 0))
    if name == 'a':  # worker 1 was killed after saving: its log may be cut
      chief = {s: v for s, v in chief.items() if s <= step}
    assert chief, cluster.log(name, 0)[-2000:]
    other = logged_losses(cluster.log(name, 1))
    for s, terms in chief.items():
      assert other.get(s, terms) == terms, (name, s)
      for k, value in terms.items():
        assert abs(value - losses[s][k]) <= 2e-3 * max(1, abs(value)), (s, k)

  # Every variable and optimizer slot of ckpt-2 (before the kill) and
  # ckpt-4 (after the restart): the difference to the reference as a
  # fraction of what training changed (a few ulps of the value at least).
  # Measured: 0, bit for bit (with two replicas every all-reduce adds two
  # numbers, which is exact in either order). Data of another shard, a
  # missing all-reduce or a lost slot give about 1.
  initial = states[0]
  worst = {}
  for at, reference in zip((step, STEPS), states[1:]):
    reader = tf.train.load_checkpoint(str(model_dir / f'ckpt-{at}'))
    for key, expected in reference.items():
      actual = reader.get_tensor(key + checkpoints.SUFFIX)
      change = max(float(np.abs(expected - initial.get(key, 0.)).max()),
                   1e-6 * float(np.abs(expected).max()), 1e-12)
      worst[(at, key)] = float(np.abs(actual - expected).max()) / change
  largest = max(worst, key=worst.get)
  print(f'largest difference / change: {worst[largest]:.3g} at {largest}')
  assert worst[largest] <= 0.05, (largest, worst[largest])


def test_sigterm_to_one_worker_stops_every_worker_at_the_same_step(
    scenario):
  """The preemption notice of one machine: both workers save at one step,
  the chief to model_dir, and exit 0; the same command resumes."""
  cluster = scenario['cluster']
  model_dir = cluster.tmp / 'preempted'
  long_run = [f'--model_dir={model_dir}', '--train_steps=100000',
              '--checkpoint_steps=100000']
  procs = cluster.start('d', (long_run, long_run))
  try:
    wait_for(lambda: 'step 3/100000' in cluster.log('d', 0), procs, 300,
             'step 3', cluster, 'd')
    procs[1].send_signal(signal.SIGTERM)
    rcs = [p.wait(timeout=120) for p in procs]
  finally:
    stop_all(procs)
  logs = [cluster.log('d', task) for task in (0, 1)]
  assert rcs == [0, 0], logs[0][-3000:]
  chief = re.search(r'Stopped by another worker at step (\d+) after saving; '
                    r'rerun the same command to resume\.', logs[0])
  worker = re.search(rf'Stopped by signal {int(signal.SIGTERM)} at step '
                     r'(\d+) after saving', logs[1])
  assert chief and worker, (logs[0][-2000:], logs[1][-2000:])
  step = int(chief.group(1))
  assert int(worker.group(1)) == step >= 3
  assert tf.train.latest_checkpoint(str(model_dir)) == str(
      model_dir / f'ckpt-{step}')
  assert not list(model_dir.glob('.run_lock.*'))
  print(f'SIGTERM to worker 1: both workers saved at step {step} and exited '
        f'0; chief: "{chief.group(0)}"')


def test_workers_resumed_at_different_steps_stop_with_one_line(scenario):
  """model_dir not shared: each worker finds its own latest checkpoint."""
  cluster, model_dir = scenario['cluster'], scenario['model_dir']
  ahead, behind = cluster.tmp / 'ahead', cluster.tmp / 'behind'
  shutil.copytree(model_dir, ahead)
  shutil.copytree(model_dir, behind)
  for path in behind.glob('ckpt-4.*'):
    path.unlink()
  tf.compat.v1.train.update_checkpoint_state(str(behind),
                                            str(behind / 'ckpt-2'))
  procs = cluster.start('e', ([f'--model_dir={ahead}', '--train_steps=6'],
                              [f'--model_dir={behind}', '--train_steps=6']))
  try:
    rcs = [p.wait(timeout=300) for p in procs]
  finally:
    stop_all(procs)
  for task, (step, where) in enumerate(((4, ahead), (2, behind))):
    log = cluster.log('e', task)
    last = log.strip().splitlines()[-1]
    assert last == (
        f'error: the workers resumed at different steps (this one at step '
        f'{step}, the mean over replicas is 3): --model_dir={where} must be '
        'one directory that every worker reads (a shared file system or '
        'gs://), not a local one per machine.'), log[-3000:]
    assert 'step 5/6' not in log
  assert rcs == [2, 2]
  assert tf.train.latest_checkpoint(str(ahead)).endswith('ckpt-4')
  assert tf.train.latest_checkpoint(str(behind)).endswith('ckpt-2')
  assert not list(ahead.glob('ckpt-6*')) and not list(behind.glob('ckpt-6*'))
