"""The frozen configuration every library module reads instead of absl flags.

`run.py` is the only reader of flags: it builds one `Config` from them and
passes it down. Tests and notebooks build a `Config` directly, e.g.
`Config(resnet_depth=18, image_size=32)`.

Field names, types and defaults are those of the original TF2 `run.py` flags,
so that a flag means the same thing here as there.
"""
import dataclasses
import math
import re
from typing import Optional

RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
# The original's, plus distill (SimCLRv2 distillation, distill.py).
TRAIN_MODES = ('pretrain', 'finetune', 'distill')
# The original's, plus convert (any checkpoint -> TF2 checkpoint and
# SavedModel, convert_checkpoint.py) and embed (features of a split to
# model_dir, embed.py).
MODES = ('train', 'eval', 'train_then_eval', 'convert', 'embed')
OPTIMIZERS = ('momentum', 'adam', 'lars')
ON_CORRUPT = ('fail', 'skip')
# Keras mixed-precision policies: layers compute in bfloat16 or float16,
# variables, the loss and batch-norm statistics stay float32; float16 (for
# GPUs) trains with dynamic loss scaling (runtime.with_loss_scaling).
PRECISIONS = ('float32', 'mixed_bfloat16', 'mixed_float16')
LR_SCALINGS = ('linear', 'sqrt')
PROJ_HEAD_MODES = ('none', 'linear', 'nonlinear')
# Batch norm of a frozen encoder (finetune with fine_tune_after_block >= 4,
# linear evaluation): 'tf2' as the original TF2 code (batch statistics, the
# moving averages follow the data), 'tf1' as the original TF1 code
# (inference mode: moving statistics used and left unchanged).
LINEAR_EVAL_PROTOCOLS = ('tf2', 'tf1')


class ConfigError(ValueError):
  """A configuration value is invalid; the message names it and what is expected."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Every hyper-parameter of a run (see README for the meaning of each)."""
  # Optimisation.
  learning_rate: float = 0.3
  learning_rate_scaling: str = 'linear'
  warmup_epochs: float = 10.
  weight_decay: float = 1e-6
  optimizer: str = 'lars'
  momentum: float = 0.9
  # Steps and batches.
  train_batch_size: int = 512
  train_epochs: int = 100
  train_steps: int = 0
  eval_steps: int = 0
  eval_batch_size: int = 256
  checkpoint_epochs: int = 1
  checkpoint_steps: int = 0
  # Data.
  dataset: str = 'imagenet2012'
  train_split: str = 'train'
  eval_split: str = 'validation'
  cache_dataset: bool = False
  data_dir: Optional[str] = None
  image_size: int = 224
  color_jitter_strength: float = 1.0
  use_blur: bool = True
  # Training augmentation of whole batches at once (data_util's batched path)
  # where images are small and share one size; the same operations as the
  # per-example path up to float rounding, several times faster there (the
  # random streams differ: a seeded run's views change with this switch).
  batched_augmentation: bool = True
  # What to run.
  mode: str = 'train'
  train_mode: str = 'pretrain'
  lineareval_while_pretraining: bool = True
  checkpoint: Optional[str] = None
  zero_init_logits_layer: bool = False
  fine_tune_after_block: int = -1
  linear_eval_protocol: str = 'tf2'
  model_dir: Optional[str] = None
  keep_checkpoint_max: int = 5
  keep_hub_module_max: int = 1
  eval_name: Optional[str] = None
  # Restoring from --checkpoint: a regex over variable names choosing what to
  # restore (the TF1 README's flag).
  variable_schema: str = '.*'
  # Restoring a released TF1 checkpoint: its `ema_model/` (moving-average)
  # copy of the weights instead of the raw ones.
  use_ema_weights: bool = False
  # Speed: the Keras precision policy of the model's layers, and XLA
  # compilation of the forward and backward pass.
  precision: str = 'float32'
  jit_compile: bool = False
  # Batch norm on the fused kernel where its statistics are local
  # (resnet._FusedLocalStatistics); None: on under mixed precision only, so
  # float32 keeps the original's unfused arithmetic.
  fused_batch_norm: Optional[bool] = None
  train_summary_steps: int = 100
  # Gradient-cached NT-Xent (grad_cache.py): each replica's pretraining
  # batch goes through the model in this many chunks (1: off), so memory is
  # that of a chunk while the negatives are the whole batch's.
  grad_cache_chunks: int = 1
  # Resuming: if the latest checkpoint in model_dir is unreadable, resume from
  # the newest readable earlier one (and say so) instead of stopping.
  resume_fallback: bool = False
  # Image folders: 'fail' on an unreadable image, or 'skip' it (and say so).
  on_corrupt: str = 'fail'
  # TFRecord files (--dataset=tfrecord:<root>, tfrecord_source.py): the
  # features holding the encoded image and the label ('': TFDS's `image`
  # and `label`, else ImageNet's `image/encoded` and `image/class/label`),
  # and the number of classes (0: one more than the largest train label).
  tfrecord_image_key: str = ''
  tfrecord_label_key: str = ''
  tfrecord_num_classes: int = 0
  # Reproducible runs: the input pipelines' shuffling and augmentations and
  # the initialisation follow this seed (None: unseeded, as the original).
  seed: Optional[int] = None
  # kNN monitor (knn_monitor.py): every `knn_monitor_steps` training steps
  # (0: never), the weighted k-NN top-1 accuracy of the encoder's
  # `final_avg_pool` features on the eval split against a bank of the first
  # `knn_bank_size` train examples (0: all), both with eval preprocessing;
  # also reported by the final evaluation when on.
  knn_monitor_steps: int = 0
  knn_bank_size: int = 10000
  knn_k: int = 200
  knn_temperature: float = 0.1
  # The final evaluation also gives the kNN accuracy of the same architecture
  # randomly initialised (the run's own start when seeded), evaluated alike.
  knn_random_init: bool = False
  # The console: this project's log lines only, unless this is True (then
  # also the libraries' INFO and WARNING lines; see console.py).
  library_logs: bool = False
  # Where to run (the original's defaults: a TPU).
  use_tpu: bool = True
  tpu_name: Optional[str] = None
  tpu_zone: Optional[str] = None
  gcp_project: Optional[str] = None
  master: Optional[str] = None
  # Loss.
  temperature: float = 0.1
  hidden_norm: bool = True
  # Heads.
  proj_head_mode: str = 'nonlinear'
  proj_out_dim: int = 128
  num_proj_layers: int = 3
  ft_proj_selector: int = 0
  # Encoder.
  global_bn: bool = True
  batch_norm_decay: float = 0.9
  # The original's flag is an integer; fractions whose channel counts come
  # out whole (0.125, 0.0625) are accepted to load narrow models.
  width_multiplier: float = 1
  resnet_depth: int = 50
  sk_ratio: float = 0.
  se_ratio: float = 0.
  # Distillation (train_mode='distill', distill.py): the fine-tuned
  # teacher's SavedModel, the temperature tau of both softmaxes, and the
  # weight of the distillation term (1 - alpha weighs the labelled loss).
  teacher: Optional[str] = None
  distill_temperature: float = 1.0
  distill_alpha: float = 1.0
  # Conversion (mode='convert', convert_checkpoint.py): a factor for the
  # encoder's conv kernels (SimCLRv1 -> v2 scale) and the largest output
  # difference accepted, relative to the output's scale.
  kernel_scale: float = 1.0
  convert_tolerance: float = 1e-4
  # Embedding (mode='embed', embed.py): also write the projection head's
  # output next to the encoder's final_avg_pool.
  embed_proj_head: bool = False

  @property
  def cifar_stem(self):
    """The original switches to the 3x3 stride-1 stem for small images."""
    return self.image_size <= 32

  @property
  def use_fused_batch_norm(self):
    if self.fused_batch_norm is None:
      return self.precision != 'float32'
    return self.fused_batch_norm

  @property
  def frozen_encoder_in_inference_mode(self):
    """The TF1 linear-evaluation protocol applies: the encoder is frozen
    whole and its batch norm runs on the moving statistics."""
    return (self.train_mode == 'finetune' and self.fine_tune_after_block >= 4
            and self.linear_eval_protocol == 'tf1')

  @property
  def has_supervised_head(self):
    return self.train_mode == 'finetune' or self.lineareval_while_pretraining

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def validate(self):
    """Raises ConfigError (one line) for the first invalid value found."""
    for name in FLOAT_FIELDS:  # nan passes every comparison below
      if not math.isfinite(getattr(self, name)):
        raise ConfigError(f'{name}={getattr(self, name)}: expected a finite '
                          'number.')
    _one_of('train_mode', self.train_mode, TRAIN_MODES)
    _one_of('mode', self.mode, MODES)
    _one_of('optimizer', self.optimizer, OPTIMIZERS)
    _one_of('learning_rate_scaling', self.learning_rate_scaling, LR_SCALINGS)
    _one_of('proj_head_mode', self.proj_head_mode, PROJ_HEAD_MODES)
    _one_of('resnet_depth', self.resnet_depth, RESNET_DEPTHS)
    _one_of('on_corrupt', self.on_corrupt, ON_CORRUPT)
    _one_of('precision', self.precision, PRECISIONS)
    _one_of('linear_eval_protocol', self.linear_eval_protocol,
            LINEAR_EVAL_PROTOCOLS)
    if self.seed is not None:
      _at_least('seed', self.seed, 0)
    _at_least('train_summary_steps', self.train_summary_steps, 0)
    _at_least('checkpoint_steps', self.checkpoint_steps, 0)
    _at_least('checkpoint_epochs', self.checkpoint_epochs, 0)
    _at_least('eval_steps', self.eval_steps, 0)
    _at_least('knn_monitor_steps', self.knn_monitor_steps, 0)
    _at_least('knn_bank_size', self.knn_bank_size, 0)
    _at_least('knn_k', self.knn_k, 1)
    _at_least('tfrecord_num_classes', self.tfrecord_num_classes, 0)
    if self.knn_temperature <= 0:
      raise ConfigError(f'knn_temperature={self.knn_temperature}: expected a '
                        'positive number.')
    if self.knn_random_init and not self.knn_monitor_steps:
      raise ConfigError('knn_random_init=True needs the kNN monitor: expected '
                        '--knn_monitor_steps > 0.')
    _at_least('keep_checkpoint_max', self.keep_checkpoint_max, 1)
    _at_least('keep_hub_module_max', self.keep_hub_module_max, 0)
    try:
      re.compile(self.variable_schema)
    except re.error as e:
      raise ConfigError(f'variable_schema={self.variable_schema!r}: not a '
                        f'regular expression ({e}).') from None
    _at_least('train_batch_size', self.train_batch_size, 1)
    _at_least('eval_batch_size', self.eval_batch_size, 1)
    _at_least('train_epochs', self.train_epochs, 0)
    _at_least('train_steps', self.train_steps, 0)
    _at_least('warmup_epochs', self.warmup_epochs, 0)
    _at_least('weight_decay', self.weight_decay, 0)
    _at_least('image_size', self.image_size, 1)
    _at_least('proj_out_dim', self.proj_out_dim, 1)
    _at_least('num_proj_layers', self.num_proj_layers, 1)
    if self.temperature <= 0:
      raise ConfigError(
          f'temperature={self.temperature}: expected a positive number.')
    if not 0 <= self.batch_norm_decay < 1:
      raise ConfigError(f'batch_norm_decay={self.batch_norm_decay}: '
                        'expected a value in [0, 1).')
    if not 0 <= self.sk_ratio < 1 or not 0 <= self.se_ratio <= 1:
      raise ConfigError(f'sk_ratio={self.sk_ratio}, se_ratio={self.se_ratio}:'
                        ' expected sk_ratio in [0, 1) and se_ratio in [0, 1].')
    if self.width_multiplier <= 0 or (
        64 * self.width_multiplier) != int(64 * self.width_multiplier):
      raise ConfigError(
          f'width_multiplier={self.width_multiplier}: expected a positive '
          'number that makes 64 * width_multiplier a whole channel count.')
    if not -1 <= self.fine_tune_after_block <= 4:
      raise ConfigError(
          f'fine_tune_after_block={self.fine_tune_after_block}: expected -1 '
          '(train everything) or a block group 0..4.')
    if self.train_mode == 'pretrain' and self.fine_tune_after_block > -1:
      raise ConfigError(
          f'fine_tune_after_block={self.fine_tune_after_block} with '
          'train_mode=pretrain: layer freezing is for finetune only; use -1.')
    if self.train_mode == 'pretrain' and self.proj_head_mode == 'none':
      raise ConfigError(
          'proj_head_mode=none with train_mode=pretrain: the contrastive loss '
          'needs a projection head (linear or nonlinear).')
    if self.train_mode == 'distill':
      if not self.teacher:
        raise ConfigError('train_mode=distill needs --teacher: the '
                          'SavedModel of the fine-tuned teacher.')
      if self.distill_temperature <= 0:
        raise ConfigError(f'distill_temperature={self.distill_temperature}: '
                          'expected a positive number.')
      if not 0 <= self.distill_alpha <= 1:
        raise ConfigError(f'distill_alpha={self.distill_alpha}: expected a '
                          'weight in [0, 1].')
    if self.mode == 'convert':
      if not self.checkpoint or not self.model_dir:
        raise ConfigError('mode=convert needs --checkpoint (the checkpoint '
                          'to convert) and --model_dir (an output '
                          'directory).')
      if self.kernel_scale <= 0 or self.convert_tolerance < 0:
        raise ConfigError(
            f'kernel_scale={self.kernel_scale}, convert_tolerance='
            f'{self.convert_tolerance}: expected a positive scale and a '
            'tolerance >= 0.')
    _at_least('grad_cache_chunks', self.grad_cache_chunks, 1)
    if self.grad_cache_chunks > 1:
      if self.train_mode != 'pretrain':
        raise ConfigError(
            f'grad_cache_chunks={self.grad_cache_chunks} with train_mode='
            f'{self.train_mode}: the gradient cache is for the contrastive '
            'loss of pretraining; use 1.')
      if self.jit_compile:
        raise ConfigError(
            f'grad_cache_chunks={self.grad_cache_chunks} with jit_compile: '
            'the chunked step is not XLA-compiled; drop one of them.')
    if self.embed_proj_head and self.proj_head_mode == 'none':
      raise ConfigError('embed_proj_head=True with proj_head_mode=none: '
                        'there is no projection head to embed with.')
    if self.use_ema_weights and not self.checkpoint:
      raise ConfigError('use_ema_weights=True without --checkpoint: it '
                        'chooses the EMA weights of the checkpoint restored.')
    num_hiddens = self.num_proj_layers if self.proj_head_mode == 'nonlinear' \
        else 1 if self.proj_head_mode == 'linear' else 0
    if not -(num_hiddens + 1) <= self.ft_proj_selector <= num_hiddens:
      raise ConfigError(
          f'ft_proj_selector={self.ft_proj_selector}: expected a value in '
          f'[{-(num_hiddens + 1)}, {num_hiddens}] for proj_head_mode='
          f'{self.proj_head_mode} with num_proj_layers={self.num_proj_layers}.')
    return self


def _one_of(name, value, allowed):
  if value not in allowed:
    raise ConfigError(f'{name}={value!r}: expected one of '
                      f'{", ".join(map(str, allowed))}.')


def _at_least(name, value, low):
  if value < low:
    raise ConfigError(f'{name}={value}: expected a value >= {low}.')


# Every float setting: each must be finite.
FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(Config)
                     if f.type in (float, 'float'))
