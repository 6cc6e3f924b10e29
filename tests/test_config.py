"""Config and run.py's flags against the original's flag defaults, and
--flagfile.

ORIGINAL_DEFAULTS is the independent reference: every flag of the original
TF2 run.py (google-research/simclr, tf2/run.py) with the default written
there, copied by hand. Every test configuration elsewhere overrides these,
so only this file sees a changed default.
"""
import pytest
from absl import flags

import config as config_lib
import run

ORIGINAL_DEFAULTS = {
    'learning_rate': 0.3,
    'learning_rate_scaling': 'linear',
    'warmup_epochs': 10,
    'weight_decay': 1e-6,
    'batch_norm_decay': 0.9,
    'train_batch_size': 512,
    'train_split': 'train',
    'train_epochs': 100,
    'train_steps': 0,
    'eval_steps': 0,
    'eval_batch_size': 256,
    'checkpoint_epochs': 1,
    'checkpoint_steps': 0,
    'eval_split': 'validation',
    'dataset': 'imagenet2012',
    'cache_dataset': False,
    'mode': 'train',
    'train_mode': 'pretrain',
    'lineareval_while_pretraining': True,
    'checkpoint': None,
    'zero_init_logits_layer': False,
    'fine_tune_after_block': -1,
    'master': None,
    'model_dir': None,
    'data_dir': None,
    'use_tpu': True,
    'tpu_name': None,
    'tpu_zone': None,
    'gcp_project': None,
    'optimizer': 'lars',
    'momentum': 0.9,
    'eval_name': None,
    'keep_checkpoint_max': 5,
    'keep_hub_module_max': 1,
    'temperature': 0.1,
    'hidden_norm': True,
    'proj_head_mode': 'nonlinear',
    'proj_out_dim': 128,
    'num_proj_layers': 3,
    'ft_proj_selector': 0,
    'global_bn': True,
    'width_multiplier': 1,
    'resnet_depth': 50,
    'sk_ratio': 0.,
    'se_ratio': 0.,
    'image_size': 224,
    'color_jitter_strength': 1.0,
    'use_blur': True,
}
# The choices of the original's enum flags.
ORIGINAL_CHOICES = {
    'learning_rate_scaling': ['linear', 'sqrt'],
    'mode': ['train', 'eval', 'train_then_eval'],
    'train_mode': ['pretrain', 'finetune'],
    'optimizer': ['momentum', 'adam', 'lars'],
    'proj_head_mode': ['none', 'linear', 'nonlinear'],
}


@pytest.mark.parametrize('name', sorted(ORIGINAL_DEFAULTS))
def test_default_is_the_originals(name):
  expected = ORIGINAL_DEFAULTS[name]
  assert name in flags.FLAGS, f'--{name} of the original is missing'
  for value in (flags.FLAGS[name].default,
                getattr(config_lib.Config(), name)):
    assert value == expected and type(value) in (type(expected), float), (
        name, value)


@pytest.mark.parametrize('name', sorted(ORIGINAL_CHOICES))
def test_choices_include_the_originals(name):
  allowed = flags.FLAGS[name].parser.enum_values
  assert set(ORIGINAL_CHOICES[name]) <= set(allowed)


def test_flagfile_sets_the_config(tmp_path):
  """`--flagfile` (absl's) reaches the Config; command-line flags after it
  win, as in absl."""
  flagfile = tmp_path / 'cifar10.flags'
  flagfile.write_text('--train_mode=finetune\n--learning_rate=1.5\n'
                      '# a comment\n--use_blur=false\n--resnet_depth=18\n'
                      '--variable_schema=(?!global_step|head)\n')
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(['run.py', f'--flagfile={flagfile}', '--resnet_depth=34'])
    cfg = run.config_from_flags()
  finally:
    flags.FLAGS.unparse_flags()
  assert (cfg.train_mode, cfg.learning_rate, cfg.use_blur,
          cfg.resnet_depth, cfg.variable_schema) == (
              'finetune', 1.5, False, 34, '(?!global_step|head)')
  # Everything else keeps the original's defaults.
  assert cfg.temperature == 0.1 and cfg.train_batch_size == 512


def test_every_flag_is_a_config_field_and_back():
  """One configuration channel: run.py defines exactly one flag per Config
  field, with the field's default and, for choices, the Config's list."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  defined = {f.name: f for f in flags.FLAGS.get_flags_for_module(run)}
  fields = {f.name: f for f in dataclasses.fields(config_lib.Config)}
  assert sorted(defined) == sorted(fields)
  default = config_lib.Config()
  for name, flag in defined.items():
    assert flag.default == getattr(default, name), name
  choices = {
      'learning_rate_scaling': config_lib.LR_SCALINGS,
      'mode': config_lib.MODES, 'train_mode': config_lib.TRAIN_MODES,
      'optimizer': config_lib.OPTIMIZERS,
      'proj_head_mode': config_lib.PROJ_HEAD_MODES,
      'precision': config_lib.PRECISIONS,
      'on_corrupt': config_lib.ON_CORRUPT,
      'linear_eval_protocol': config_lib.LINEAR_EVAL_PROTOCOLS}
  enums = {n for n, f in defined.items() if hasattr(f.parser, 'enum_values')}
  assert enums == set(choices)
  for name, allowed in choices.items():
    assert list(defined[name].parser.enum_values) == list(allowed), name


FLOAT_FLAGS = sorted(
    f.name for f in flags.FLAGS.get_flags_for_module(run)
    if f.parser.flag_type() == 'float')


@pytest.mark.parametrize('value', ['nan', 'inf', '-inf'])
@pytest.mark.parametrize('name', FLOAT_FLAGS)
def test_every_float_flag_must_be_finite(name, value, tmp_path, capsys,
                                         monkeypatch):
  """run.py stops before any work, with one line, for every float flag
  (taken from run.py's definitions) given nan or an infinity."""
  import helpers  # pylint: disable=import-outside-toplevel
  import runtime  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(runtime, 'prepare', lambda cfg: pytest.fail('work'))
  code = helpers.run_main_exit_code(
      ['--use_tpu=False', f'--model_dir={tmp_path}', f'--{name}={value}'])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'error: {name}={float(value)}: expected a finite number.']


def test_the_float_flags_are_the_expected_ones():
  # Written down by hand: the original's ten, and ours.
  assert FLOAT_FLAGS == sorted([
      'learning_rate', 'warmup_epochs', 'weight_decay', 'momentum',
      'color_jitter_strength', 'temperature', 'batch_norm_decay',
      'width_multiplier', 'sk_ratio', 'se_ratio', 'knn_temperature',
      'distill_temperature', 'distill_alpha', 'kernel_scale',
      'convert_tolerance'])
