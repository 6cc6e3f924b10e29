"""Bad command lines stop before any model is built, with one line naming the
value and what was expected (run.py's main, in process, so each case is fast)."""
import subprocess
import sys

import pytest
import tensorflow as tf

import conftest
import helpers
import runtime
import training

TFDS = conftest.SHARED / 'tfds'


def base(tmp_path):
  return ['--use_tpu=False', '--dataset=cifar10', f'--data_dir={TFDS}',
          '--eval_split=test', '--resnet_depth=18', '--image_size=32',
          f'--model_dir={tmp_path / "m"}', '--train_steps=1',
          '--train_batch_size=8', '--eval_batch_size=8']


main_exit_code = helpers.run_main_exit_code


CASES = [
    (['--train_mode=pretrain', '--proj_head_mode=none'], 'proj_head_mode'),
    (['--train_mode=pretrain', '--fine_tune_after_block=2'], 'fine_tune_after_block'),
    (['--train_mode=finetune', '--fine_tune_after_block=5'], 'fine_tune_after_block'),
    (['--train_mode=finetune', '--fine_tune_after_block=-2'], 'fine_tune_after_block'),
    (['--ft_proj_selector=4'], 'ft_proj_selector'),
    (['--ft_proj_selector=-5'], 'ft_proj_selector'),
    (['--proj_head_mode=linear', '--ft_proj_selector=2'], 'ft_proj_selector'),
    (['--num_proj_layers=0'], 'num_proj_layers'),
    (['--proj_out_dim=0'], 'proj_out_dim'),
    (['--resnet_depth=42'], 'resnet_depth'),
    (['--width_multiplier=0'], 'width_multiplier'),
    (['--image_size=0'], 'image_size'),
    (['--temperature=0'], 'temperature'),
    (['--temperature=-1'], 'temperature'),
    (['--batch_norm_decay=1.5'], 'batch_norm_decay'),
    (['--sk_ratio=-0.5'], 'sk_ratio'),
    (['--se_ratio=2'], 'se_ratio'),
    (['--train_batch_size=0'], 'train_batch_size'),
    (['--eval_batch_size=0'], 'eval_batch_size'),
    (['--train_steps=-3'], 'train_steps'),
    (['--train_epochs=-1'], 'train_epochs'),
    (['--warmup_epochs=-1'], 'warmup_epochs'),
    (['--weight_decay=-1e-4'], 'weight_decay'),
    (['--checkpoint_steps=-1'], 'checkpoint_steps'),
    (['--keep_checkpoint_max=0'], 'keep_checkpoint_max'),
    (['--eval_steps=-1'], 'eval_steps'),
    (['--train_summary_steps=-1'], 'train_summary_steps'),
    (['--knn_monitor_steps=-1'], 'knn_monitor_steps'),
    (['--knn_bank_size=-5'], 'knn_bank_size'),
    (['--knn_k=0'], 'knn_k'),
    (['--knn_temperature=0'], 'knn_temperature'),
    (['--knn_monitor_steps=5', '--eval_split=validation'], "split 'validation'"),
    (['--variable_schema=(unclosed'], 'variable_schema'),
    (['--dataset=no_such_dataset_xyz'], 'no_such_dataset_xyz'),
    (['--dataset=cifar100'], 'not prepared'),
    (['--dataset=folder:/nonexistent/images'], '/nonexistent/images'),
    (['--train_split=nope'], "split 'nope'"),
    (['--mode=train_then_eval', '--eval_split=validation'], "split 'validation'"),
    (['--checkpoint=/nonexistent/ckpt-7', '--train_mode=finetune'], '/nonexistent/ckpt-7'),
    (['--use_ema_weights'], 'use_ema_weights'),
    (['--model_dir=/proc/simclr_not_writable'], 'not writable'),
    (['--model_dir='], '--model_dir is required'),
    (['--use_tpu=True'], 'use_tpu'),
    (['--train_mode=distill'], '--teacher'),
    (['--train_mode=distill', '--teacher=/nonexistent/teacher'], '/nonexistent/teacher'),
    (['--train_mode=distill', '--teacher=/tmp', '--distill_alpha=2'], 'distill_alpha'),
    (['--learning_rate=nan'], 'learning_rate=nan: expected a finite'),
    (['--momentum=inf'], 'momentum=inf: expected a finite'),
    (['--train_mode=distill', '--teacher=/tmp', '--distill_temperature=0'],
     'distill_temperature'),
    (['--mode=convert', '--checkpoint=/tmp', '--kernel_scale=0'],
     'kernel_scale'),
    (['--mode=convert'], '--checkpoint'),
    (['--mode=convert', '--checkpoint=/nonexistent/ckpt-3'], '/nonexistent/ckpt-3'),
]


@pytest.mark.parametrize('args,expected', CASES,
                         ids=[' '.join(a) for a, _ in CASES])
def test_bad_input_stops_with_one_line(tmp_path, capsys, monkeypatch, args,
                                       expected):
  conftest.require(TFDS)
  built = []
  monkeypatch.setattr(runtime, 'build_model',
                      lambda *a: built.append(a) or pytest.fail('built'))
  assert main_exit_code(base(tmp_path) + args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith('error: ') and expected in err[-1], err
  assert not built


def test_unknown_flag_is_refused_by_name():
  proc = subprocess.run([sys.executable, str(conftest.ROOT / 'run.py'),
                         '--use_tpu=False', '--learning_rat=0.1'],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "Unknown command line flag 'learning_rat'" in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_out_of_memory_gives_a_hint(tmp_path, capsys, monkeypatch):
  def exhausted(cfg):
    del cfg
    raise tf.errors.ResourceExhaustedError(None, None, 'OOM when allocating')
  monkeypatch.setattr(training, 'run', exhausted)
  assert main_exit_code(base(tmp_path) + ['--train_batch_size=4096']) == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith('error: out of memory with --train_batch_size=4096')
  assert 'smaller batches' in last
