"""--mode=embed: the encoder's features of a split, written to model_dir.

    python run.py --mode=embed --checkpoint=<any format> --dataset=cifar10 \
        --eval_split=test --image_size=32 --resnet_depth=18 ... \
        --model_dir=/tmp/features

The weights come from `--checkpoint` (a TF2 checkpoint, a released-format
SavedModel or a TF1 checkpoint of the original: checkpoints.restore_model),
else from the latest checkpoint in `--model_dir`. The images of
`--eval_split` get the evaluation preprocessing; the model runs in inference
mode (training=False) on every replica, and every example is embedded
exactly once.

Output, `<model_dir>/embeddings/<split>.npz` (`np.load` reads it without
pickle), in the split's order:
    final_avg_pool    [N, D] float32, the representation h of the paper
    proj_head_output  [N, P] float32, with --embed_proj_head
    label             [N] int64 (-1: an unlabelled dataset)
    id                [N] str, the example's id (file path, TFDS id, ...)
    index             [N] int64, its position in the split
"""
import io
import os
import re
import time

from absl import logging
import numpy as np
import tensorflow as tf

import checkpoints
import data as data_lib
import feature_extractor
import runtime
import storage

# Lines while embedding: about this many, plus the last.
PROGRESS_LINES = 10


def output_path(model_dir, split):
  """Where the embeddings of `split` go: slices get a name without
  brackets or colons ('train[:10%]': train.-10%.npz, 'train[10%:]':
  train.10%-.npz)."""
  name = split.replace('[', '.').replace(']', '').replace(':', '-')
  name = re.sub(r'[^A-Za-z0-9_.+%-]', '_', name)
  return os.path.join(model_dir, 'embeddings', f'{name}.npz')


def endpoint_names(cfg):
  return ['final_avg_pool'] + (['proj_head_output'] if cfg.embed_proj_head
                               else [])


def load_model(cfg, strategy):
  """The model of `cfg`'s architecture with the weights to embed with;
  returns (model, checkpoint path)."""
  path = cfg.checkpoint or tf.train.latest_checkpoint(cfg.model_dir)
  if not path:
    raise checkpoints.CheckpointError(
        f'--mode=embed needs weights: no --checkpoint and no checkpoint in '
        f'--model_dir={cfg.model_dir}.')
  checkpoints.check_checkpoint(path, cfg.use_ema_weights)
  # The heads follow the checkpoint: a supervised head only if it has one.
  num_classes = checkpoints.supervised_classes(path)
  model_cfg = cfg.replace(
      train_mode='pretrain' if cfg.proj_head_mode != 'none' else 'finetune',
      fine_tune_after_block=-1,
      lineareval_while_pretraining=num_classes is not None)
  model = runtime.build_model(model_cfg, num_classes or 1, strategy)
  with strategy.scope():
    checkpoints.restore_model(model, path, cfg.variable_schema,
                              use_ema=cfg.use_ema_weights)
  return model, path


def embed(cfg):
  """Runs --mode=embed; returns a summary dict (the path written, counts).

  With several workers each embeds its share of the split; the outputs are
  gathered on every worker and the chief writes them.
  """
  source = data_lib.source_for(cfg)
  source.num_examples(cfg.eval_split)  # a bad split stops before any work
  strategy = runtime.prepare(cfg)
  model, path = load_model(cfg, strategy)
  arrays = embed_split(cfg, source, strategy, model)
  target = output_path(cfg.model_dir, cfg.eval_split)
  if runtime.is_chief(strategy):
    write_npz(target, arrays)
  logging.info('Wrote %s: %s', target, ', '.join(
      f'{k} {list(v.shape)}' for k, v in arrays.items()))
  names = endpoint_names(cfg)
  return {'embeddings': target, 'split': cfg.eval_split,
          'examples': len(arrays['index']), 'checkpoint': path,
          **{name: list(arrays[name].shape) for name in names}}


def embed_split(cfg, source, strategy, model):
  """The arrays of the .npz file (see the module's docstring) for
  `cfg.eval_split`, embedded by `model` on `strategy`'s replicas."""
  split = cfg.eval_split
  num_examples = source.num_examples(split)
  names = endpoint_names(cfg)

  def encode(images):
    outputs = model.endpoints(images, training=False)
    return {name: outputs[name] for name in names}

  steps = data_lib.eval_steps(num_examples, cfg.eval_batch_size,
                              strategy.num_replicas_in_sync,
                              data_lib.num_input_pipelines(strategy))
  with strategy.scope():
    dataset = data_lib.build_distributed_dataset(
        source, cfg.eval_batch_size, False, strategy, cfg, with_index=True)
  extractor = feature_extractor.FeatureExtractor(strategy, encode)
  logging.info('Embedding the %d examples of %s split %r (%s): %d batches '
               'of %d', num_examples, source.name, split, ', '.join(names),
               steps, cfg.eval_batch_size)
  every = max(1, steps // PROGRESS_LINES)
  start, done, parts = time.time(), 0, []
  for step, batch in enumerate(extractor.batches(dataset, steps), 1):
    parts.append(batch)
    done += len(batch['index'])
    if step % every == 0 or step == steps:
      elapsed = max(time.time() - start, 1e-9)
      logging.info('embedded %d/%d | %.1f images/s | %.1f min left', done,
                   num_examples, done / elapsed,
                   (num_examples - done) * elapsed / max(done, 1) / 60)
  arrays = tf.nest.map_structure(lambda *a: np.concatenate(a), *parts)
  order = np.argsort(arrays['index'], kind='stable')
  index = arrays['index'][order]
  if not np.array_equal(index, np.arange(num_examples)):
    raise RuntimeError(f'embedded {len(index)} examples of {num_examples}, '
                       'not each exactly once: please report this.')
  result = {name: arrays['features'][name][order] for name in names}
  result['label'] = arrays['label'][order]
  result['id'] = np.array(source.ids(split), dtype=str)
  result['index'] = index
  return result


def write_npz(path, arrays):
  """`np.savez` to `path` atomically (gs:// works); a failed write stops
  with storage.WriteFailed."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  storage.write_or_stop(path, buffer.getvalue(), 'nothing else was written.')
