"""Distillation on two workers (run.py --train_mode=distill, two processes
on 127.0.0.1): it runs on the runtime's loop like pretraining, so only the
chief writes to model_dir, a lost worker stops the other with one line, and
a restart resumes both workers at the same step and finishes.

Launch A distils from the tiny teacher until the chief has saved ckpt-2,
then worker 1 is SIGKILLed; launch B is the same command.
"""
import json
import os

import pytest

from cluster import assert_both_resumed_and_finished
from cluster import Cluster, kill_and_restart

STEPS = 4


@pytest.fixture(scope='module')
def scenario(tmp_path_factory, shapes10_dir, tiny_teacher):
  tmp = tmp_path_factory.mktemp('distill2')
  model_dir = tmp / 'model'
  args = ['--train_mode=distill', f'--teacher={tiny_teacher}',
          '--dataset=shapes10', f'--data_dir={shapes10_dir}',
          '--eval_split=test', '--use_tpu=False', '--resnet_depth=18',
          '--width_multiplier=0.0625', '--image_size=32',
          '--train_batch_size=8', f'--train_steps={STEPS}',
          '--checkpoint_steps=2', '--train_summary_steps=1',
          '--optimizer=momentum', '--learning_rate=0.1', '--warmup_epochs=0',
          '--weight_decay=0', '--eval_batch_size=50', '--eval_steps=1',
          '--seed=5', '--distill_temperature=2', '--distill_alpha=0.9',
          f'--model_dir={model_dir}']
  cluster = Cluster(tmp, args)
  return dict(cluster=cluster, model_dir=model_dir, tmp=tmp,
              **kill_and_restart(cluster, model_dir))


def test_lost_worker_stops_the_chief_with_one_line(scenario):
  log = scenario['cluster'].log('a', 0)
  assert scenario['chief_rc'] == 2, log[-3000:]
  last = log.strip().splitlines()[-1]
  assert last.startswith('error: lost contact with '), last
  assert 'restart every worker with the same command' in last
  assert 'Traceback' not in log


def test_restart_resumes_both_workers_at_the_same_step(scenario):
  cluster, model_dir = scenario['cluster'], scenario['model_dir']
  assert_both_resumed_and_finished(cluster, model_dir, scenario['resumed_at'],
                                   scenario['rcs'], STEPS)
  # Both print the same evaluation (means over the whole eval split).
  results = [json.loads(cluster.log('b', t).strip().splitlines()[-1])
             for t in (0, 1)]
  assert results[0] == results[1]
  assert results[0]['global_step'] == STEPS
  assert json.loads((model_dir / 'result.json').read_text()) == results[0]


def test_only_the_chief_writes_to_model_dir(scenario):
  model_dir, tmp = scenario['model_dir'], scenario['tmp']
  events = [n for n in os.listdir(model_dir) if n.startswith('events.')]
  assert len(events) == 2  # one per launch of the chief, none from worker 1
  assert set(os.listdir(model_dir)) == {
      'ckpt-2.index', 'ckpt-2.data-00000-of-00001', 'ckpt-4.index',
      'ckpt-4.data-00000-of-00001', 'checkpoint', 'saved_model',
      'result.json', *events}
  assert os.listdir(model_dir / 'saved_model') == [str(STEPS)]
  # Worker 1 saved to a temporary directory of its own, removed at exit.
  assert os.listdir(tmp / 'b_tmp1') == []
