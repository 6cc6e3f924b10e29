r"""SimCLR command line: pretrain, finetune, linear eval, eval, export,
distillation, checkpoint conversion and feature export.

    python run.py --train_mode=pretrain --dataset=shapes10 --use_tpu=False \
        --resnet_depth=18 --image_size=32 --train_batch_size=128 \
        --train_epochs=10 --model_dir=/tmp/simclr
    python run.py --train_mode=distill --teacher=<SavedModel> ...  # distill.py
    python run.py --mode=convert --checkpoint=<any> --model_dir=<out> ...
                                                    # convert_checkpoint.py
    python run.py --mode=embed --checkpoint=<any> --model_dir=<out> ...
                                                    # embed.py

Flags keep the original TF2 run.py's names, defaults and meanings (plus the
TF1 README's `--train_summary_steps` and `--variable_schema`). This is the
only module that reads FLAGS: every flag is a field of `config.Config` (its
default and choices come from there), and the frozen Config of the run is
what reaches the modes: training.py (pretrain, finetune), distill.py,
convert_checkpoint.py, embed.py. Nothing imports this module.
"""
import json
import sys

import console  # first: TensorFlow's native start-up lines are hidden
console.hide_native_startup()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import tensorflow as tf

import checkpoints
import config as config_lib
import convert_checkpoint
import data as data_lib
import distill
import embed
import runtime
import storage
import training

FLAGS = flags.FLAGS
_D = config_lib.Config()  # defaults come from the Config, defined once

flags.DEFINE_float('learning_rate', _D.learning_rate,
                   'Initial learning rate per batch size of 256.')
flags.DEFINE_enum('learning_rate_scaling', _D.learning_rate_scaling,
                  list(config_lib.LR_SCALINGS),
                  'How to scale the learning rate as a function of batch size.')
flags.DEFINE_float('warmup_epochs', _D.warmup_epochs,
                   'Number of epochs of warmup.')
flags.DEFINE_float('weight_decay', _D.weight_decay, 'Amount of weight decay.')
flags.DEFINE_float('batch_norm_decay', _D.batch_norm_decay,
                   'Batch norm decay parameter.')
flags.DEFINE_integer('train_batch_size', _D.train_batch_size,
                     'Batch size for training.')
flags.DEFINE_string('train_split', _D.train_split, 'Split for training.')
flags.DEFINE_integer('train_epochs', _D.train_epochs,
                     'Number of epochs to train for.')
flags.DEFINE_integer('train_steps', _D.train_steps,
                     'Number of steps to train for. If provided, overrides '
                     'train_epochs.')
flags.DEFINE_integer('eval_steps', _D.eval_steps,
                     'Number of steps to eval for. If not provided, evals over '
                     'the entire dataset.')
flags.DEFINE_integer('eval_batch_size', _D.eval_batch_size,
                     'Batch size for eval.')
flags.DEFINE_integer('checkpoint_epochs', _D.checkpoint_epochs,
                     'Number of epochs between checkpoints/summaries.')
flags.DEFINE_integer('checkpoint_steps', _D.checkpoint_steps,
                     'Number of steps between checkpoints/summaries. If '
                     'provided, overrides checkpoint_epochs.')
flags.DEFINE_string('eval_split', _D.eval_split, 'Split for evaluation.')
flags.DEFINE_string('dataset', _D.dataset,
                    'Name of a TFDS dataset, shapes10 (the embedded dataset), '
                    'folder:/path/to/root for your own images (one directory '
                    'per class), unlabelled:/path/to/root (images at any '
                    'depth, for pretraining) or tfrecord:/path/to/root '
                    '(TFRecord files; splits are file patterns under it).')
flags.DEFINE_bool('cache_dataset', _D.cache_dataset,
                  'Whether to cache the entire dataset in memory. If the '
                  'dataset is ImageNet, this is a very bad idea, but for '
                  'smaller datasets it can improve performance.')
# 'convert' and 'distill' are new here (config.MODES, config.TRAIN_MODES).
flags.DEFINE_enum('mode', _D.mode, list(config_lib.MODES),
                  'Whether to perform training or evaluation; convert: '
                  'write --checkpoint (any format) to --model_dir as a TF2 '
                  'checkpoint and a released-format SavedModel; embed: '
                  'write the features of --eval_split to '
                  '--model_dir/embeddings/<split>.npz.')
flags.DEFINE_enum('train_mode', _D.train_mode,
                  list(config_lib.TRAIN_MODES),
                  'The train mode controls different objectives and trainable '
                  'components; distill: SimCLRv2 distillation of --teacher '
                  'into the model described by the model flags.')
flags.DEFINE_bool('lineareval_while_pretraining',
                  _D.lineareval_while_pretraining,
                  'Whether to finetune supervised head while pretraining.')
flags.DEFINE_string('checkpoint', _D.checkpoint,
                    'Loading from the given checkpoint for fine-tuning if a '
                    'finetuning checkpoint does not already exist in '
                    'model_dir.')
flags.DEFINE_bool('zero_init_logits_layer', _D.zero_init_logits_layer,
                  'If True, zero initialize layers after avg_pool for '
                  'supervised learning.')
flags.DEFINE_integer('fine_tune_after_block', _D.fine_tune_after_block,
                     'The layers after which block that we will fine-tune. -1 '
                     'means fine-tuning everything. 0 means fine-tuning after '
                     'stem block. 4 means fine-tuning just the linear head.')
flags.DEFINE_enum('linear_eval_protocol', _D.linear_eval_protocol,
                  list(config_lib.LINEAR_EVAL_PROTOCOLS),
                  'Batch norm of a frozen encoder (--fine_tune_after_block=4, '
                  'linear evaluation): tf2 as the original TF2 code (batch '
                  'statistics; the moving averages follow the data), tf1 as '
                  'the original TF1 code, whose figures the README quotes '
                  '(inference mode: the encoder is left bit-unchanged).')
flags.DEFINE_string('master', _D.master,
                    'Address/name of the TensorFlow master to use. By '
                    'default, use an in-process master.')
flags.DEFINE_string('model_dir', _D.model_dir,
                    'Model directory for training.')
flags.DEFINE_string('data_dir', _D.data_dir,
                    'Directory where dataset is stored.')
flags.DEFINE_bool('use_tpu', _D.use_tpu, 'Whether to run on TPU.')
flags.DEFINE_string('tpu_name', _D.tpu_name,
                    'The Cloud TPU to use for training. This should be either '
                    'the name used when creating the Cloud TPU, or a '
                    'grpc://ip.address.of.tpu:8470 url.')
flags.DEFINE_string('tpu_zone', _D.tpu_zone,
                    '[Optional] GCE zone where the Cloud TPU is located in.')
flags.DEFINE_string('gcp_project', _D.gcp_project,
                    '[Optional] Project name for the Cloud TPU-enabled '
                    'project.')
flags.DEFINE_enum('optimizer', _D.optimizer, list(config_lib.OPTIMIZERS),
                  'Optimizer to use.')
flags.DEFINE_float('momentum', _D.momentum, 'Momentum parameter.')
flags.DEFINE_string('eval_name', _D.eval_name, 'Name for eval.')
flags.DEFINE_integer('keep_checkpoint_max', _D.keep_checkpoint_max,
                     'Maximum number of checkpoints to keep.')
flags.DEFINE_integer('keep_hub_module_max', _D.keep_hub_module_max,
                     'Maximum number of Hub modules to keep.')
flags.DEFINE_float('temperature', _D.temperature,
                   'Temperature parameter for contrastive loss.')
flags.DEFINE_boolean('hidden_norm', _D.hidden_norm,
                     'Temperature parameter for contrastive loss.')
flags.DEFINE_enum('proj_head_mode', _D.proj_head_mode,
                  list(config_lib.PROJ_HEAD_MODES),
                  'How the head projection is done.')
flags.DEFINE_integer('proj_out_dim', _D.proj_out_dim,
                     'Number of head projection dimension.')
flags.DEFINE_integer('num_proj_layers', _D.num_proj_layers,
                     'Number of non-linear head layers.')
flags.DEFINE_integer('ft_proj_selector', _D.ft_proj_selector,
                     'Which layer of the projection head to use during '
                     'fine-tuning. 0 means no projection head, and -1 means '
                     'the final layer.')
flags.DEFINE_boolean('global_bn', _D.global_bn,
                     'Whether to aggregate BN statistics across distributed '
                     'cores.')
# An integer in the original; a float here so narrow models (0.5, 0.125:
# 64 * width must be whole) can be built from the command line too.
flags.DEFINE_float('width_multiplier', _D.width_multiplier,
                   'Multiplier to change width of network.')
flags.DEFINE_integer('resnet_depth', _D.resnet_depth, 'Depth of ResNet.')
flags.DEFINE_float('sk_ratio', _D.sk_ratio,
                   'If it is bigger than 0, it will enable SK. Recommendation: '
                   '0.0625.')
flags.DEFINE_float('se_ratio', _D.se_ratio,
                   'If it is bigger than 0, it will enable SE.')
flags.DEFINE_integer('image_size', _D.image_size, 'Input image size.')
flags.DEFINE_float('color_jitter_strength', _D.color_jitter_strength,
                   'The strength of color jittering.')
flags.DEFINE_boolean('use_blur', _D.use_blur,
                     'Whether or not to use Gaussian blur for augmentation '
                     'during pretraining.')
# From the TF1 README's commands.
flags.DEFINE_integer('train_summary_steps', _D.train_summary_steps,
                     'Steps between training summaries and progress lines '
                     '(0: at checkpoints only).')
flags.DEFINE_string('variable_schema', _D.variable_schema,
                    'Regex over variable names: what --checkpoint restores, '
                    "e.g. '(?!global_step|(?:.*/|^)Momentum|head)'.")
# New here.
flags.DEFINE_bool('use_ema_weights', _D.use_ema_weights,
                  'With a released TF1 --checkpoint: restore its ema_model/ '
                  '(exponential moving average) weights.')
flags.DEFINE_enum('precision', _D.precision, list(config_lib.PRECISIONS),
                  'Keras precision policy of the layers: float32 (as the '
                  'original), mixed_bfloat16 (bfloat16 compute; variables, '
                  'loss and batch-norm statistics in float32: TPUs, CPUs with '
                  'BF16) or mixed_float16 (float16 compute with dynamic loss '
                  'scaling: GPUs).')
flags.DEFINE_bool('fused_batch_norm', _D.fused_batch_norm,
                  'Batch norm on the fused kernel where its statistics are '
                  'local (one replica, or --global_bn=False): 1.07-1.5x the '
                  'float32 step on CPU; equal up to float rounding. Unset: on '
                  'with mixed precision, off with float32 (the original\'s '
                  'arithmetic).')
flags.DEFINE_integer('grad_cache_chunks', _D.grad_cache_chunks,
                     'Pretraining: pass each replica\'s batch through the '
                     'model in this many chunks with a gradient cache (Gao '
                     'et al. 2021): the memory of a chunk, the negatives of '
                     'the whole batch; batch norm then normalises per chunk. '
                     '1: off.')
flags.DEFINE_bool('jit_compile', _D.jit_compile,
                  'Compile the forward and backward pass with XLA (one '
                  'replica per process; off by default: slower on CPU).')
flags.DEFINE_bool('resume_fallback', _D.resume_fallback,
                  'If the latest checkpoint in model_dir is unreadable, '
                  'resume from the newest readable earlier one instead of '
                  'stopping.')
flags.DEFINE_bool('batched_augmentation', _D.batched_augmentation,
                  'Augment training images a whole batch at a time when they '
                  'share one size of at most '
                  f'{data_lib.BATCHED_AUGMENTATION_MAX_SIZE} px (same '
                  'operations as per image, up to float rounding; faster).')
flags.DEFINE_enum('on_corrupt', _D.on_corrupt, list(config_lib.ON_CORRUPT),
                  'Image folders: stop at an unreadable image, or skip it '
                  '(each one is logged).')
flags.DEFINE_string('tfrecord_image_key', _D.tfrecord_image_key,
                    '--dataset=tfrecord:<root>: the feature of the encoded '
                    "images (unset: 'image', else 'image/encoded').")
flags.DEFINE_string('tfrecord_label_key', _D.tfrecord_label_key,
                    '--dataset=tfrecord:<root>: the int64 feature of the '
                    "labels (unset: 'label', else 'image/class/label'; "
                    'neither: unlabelled).')
flags.DEFINE_integer('tfrecord_num_classes', _D.tfrecord_num_classes,
                     '--dataset=tfrecord:<root>: number of classes (0: one '
                     'more than the largest label of --train_split).')
flags.DEFINE_integer('knn_monitor_steps', _D.knn_monitor_steps,
                     'Steps between kNN monitor evaluations while training '
                     '(0: off): weighted k-NN top-1 accuracy of the encoder\'s '
                     'final_avg_pool features on --eval_split against a bank '
                     'of --train_split features, logged and written to '
                     'TensorBoard as eval/knn_top_1_accuracy; when on, the '
                     'final evaluation reports it too.')
flags.DEFINE_integer('knn_bank_size', _D.knn_bank_size,
                     'kNN monitor: how many train examples (the first ones '
                     'of --train_split, eval preprocessing) form the feature '
                     'bank; 0: all of them.')
flags.DEFINE_integer('knn_k', _D.knn_k, 'kNN monitor: neighbours that vote.')
flags.DEFINE_float('knn_temperature', _D.knn_temperature,
                   'kNN monitor: temperature T of the votes exp(cos / T).')
flags.DEFINE_bool('knn_random_init', _D.knn_random_init,
                  'kNN monitor: the final evaluation also evaluates the same '
                  'architecture randomly initialised (as the run started, '
                  'when --seed is set) and prints both accuracies in one '
                  'line.')
flags.DEFINE_bool('library_logs', _D.library_logs,
                  "Also show the libraries' Python log lines (TensorFlow, "
                  "TFDS, Keras); TensorFlow's native ones come back with "
                  'the environment variable TF_CPP_MIN_LOG_LEVEL=0.')
# Distillation (--train_mode=distill, distill.py).
flags.DEFINE_string('teacher', _D.teacher, 'Distillation: SavedModel of the '
                    'fine-tuned teacher (released format, with logits_sup; '
                    'gs:// works).')
flags.DEFINE_float('distill_temperature', _D.distill_temperature,
                   'Distillation: tau; teacher and student logits are divided '
                   'by it before the softmax of the distillation term.')
flags.DEFINE_float('distill_alpha', _D.distill_alpha,
                   'Distillation: weight of the distillation term; 1 - alpha '
                   'weighs the cross entropy with the dataset labels (needs a '
                   "teacher with the dataset's classes). 1: labels unused.")
# Conversion (--mode=convert, convert_checkpoint.py).
flags.DEFINE_float('kernel_scale', _D.kernel_scale,
                   'Conversion: multiply the encoder conv kernels that feed a '
                   "batch norm by this (and that batch norm's moving "
                   'statistics to match), e.g. 0.06 to bring SimCLRv1 weights '
                   'to the scale of SimCLRv2 ones for fine-tuning with '
                   '--optimizer=momentum.')
flags.DEFINE_float('convert_tolerance', _D.convert_tolerance,
                   'Conversion: largest output difference accepted, relative '
                   'to the output scale.')
# Embedding (--mode=embed, embed.py).
flags.DEFINE_bool('embed_proj_head', _D.embed_proj_head,
                  'Embedding: also write proj_head_output next to '
                  'final_avg_pool.')
flags.DEFINE_integer('seed', _D.seed,
                     'Seed of the input pipelines (shuffling, augmentations) '
                     'and the initialisation: the same batches, views and '
                     'initial weights (multi-threaded float arithmetic can '
                     'still make two runs drift apart); unset: unseeded, as '
                     'the original.')


def config_from_flags(**overrides):
  """The frozen Config of this run, validated (ConfigError on bad values)."""
  fields = config_lib.Config.__dataclass_fields__
  values = {name: FLAGS[name].value for name in fields if name in FLAGS}
  values.update(overrides)
  return config_lib.Config(**values).validate()


def run_distill(cfg):
  """--train_mode=distill (distill.py); prints the evaluation's JSON line."""
  result = distill.distill(cfg)
  if result is not None:
    print(json.dumps(result))


def run_convert(cfg):
  """--mode=convert (convert_checkpoint.py): prints the summary's JSON line
  and exits 1 when the outputs differ by more than --convert_tolerance."""
  summary = convert_checkpoint.convert(
      cfg.checkpoint, cfg.model_dir, cfg, use_ema=cfg.use_ema_weights,
      kernel_scale=cfg.kernel_scale)
  print(json.dumps(summary))
  worst = max(summary['max_rel_diff'].values())
  if worst > cfg.convert_tolerance:
    print(f'error: converted outputs differ from the source by {worst:.3g} '
          f'(relative) > --convert_tolerance={cfg.convert_tolerance}.',
          file=sys.stderr)
    sys.exit(1)


def run_embed(cfg):
  """--mode=embed (embed.py): prints the summary's JSON line."""
  print(json.dumps(embed.embed(cfg)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  console.show_run_lines_only(FLAGS.library_logs)
  try:
    cfg = config_from_flags()
    if cfg.mode == 'convert':
      run_convert(cfg)
    elif cfg.mode == 'embed':
      run_embed(cfg)
    elif cfg.train_mode == 'distill':
      run_distill(cfg)
    else:
      training.run(cfg)
  except (config_lib.ConfigError, data_lib.DatasetError,
          checkpoints.CheckpointError, runtime.TrainingDiverged,
          storage.WriteFailed) as e:
    # One line for the person at the terminal, no stack trace.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except tf.errors.ResourceExhaustedError as e:
    if 'No space left' in str(e):  # a write not explained where it failed
      where = str(e).splitlines()[-1][:200]
      print(f'error: no space left on device ({where}); free some space '
            'and rerun the same command to resume from the last checkpoint '
            f'in --model_dir={FLAGS.model_dir}.', file=sys.stderr)
      sys.exit(2)
    print(f'error: out of memory with --train_batch_size='
          f'{FLAGS.train_batch_size} and --eval_batch_size='
          f'{FLAGS.eval_batch_size} (per replica: divided by the replicas); '
          'try smaller batches or a smaller --resnet_depth/--width_multiplier.',
          file=sys.stderr)
    sys.exit(2)
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
          tf.errors.CancelledError, tf.errors.AbortedError) as e:
    # In a multi-worker run these mean a worker died or became unreachable
    # (TensorFlow aborts the collectives of every other worker).
    if not runtime.tf_config_names_workers():
      raise
    print(f'error: {runtime.lost_worker_message(e, FLAGS.model_dir)}',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
