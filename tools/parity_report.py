"""Prints the largest differences between this code and the original's
reference outputs (../shared), one JSON line per check.

    python tools/parity_report.py

The tests assert tolerances; this script shows how far inside them we are.
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf

import helpers
import objective
import test_original_checkpoints
import test_parity_det
import training


def report(check, **figures):
  print(json.dumps({'check': check, **figures}), flush=True)


def det_config(name, tmp):
  case = test_parity_det.Case(name, tmp)
  for mode in (False, True):
    outs = dict(zip(('hiddens', 'proj_out', 'sup_in', 'logits'),
                    case.forward(mode)))
    prefix = 'train' if mode else 'eval'
    report(f'{name}/{prefix} outputs (max |diff| / max(1, max |ref|))',
           **{k: helpers.max_rel_diff(v.numpy(), case.fx[f'{prefix}/{k}'])
              for k, v in outs.items()})
  case.assign()
  fx = case.fx
  step = tf.function(training.make_train_step(case.model, case.optimizer,
                                              case.config))
  terms = step(case.inputs, tf.constant(fx['labels_onehot']))
  report(f'{name}/one step loss terms (abs diff)',
         **{k: abs(float(v) - float(fx[f'step/{k}'])) for k, v in terms.items()})
  worst_l2, worst_sum, count = 0., 0., 0
  for key, var in helpers.variables_by_key(case.checkpoint).items():
    if not var.dtype.is_floating:
      continue
    value = var.numpy().astype(np.float64)
    ref_l2 = float(fx[f'step/{key}/l2'])
    l2 = np.sqrt(np.square(value).sum())
    worst_l2 = max(worst_l2, abs(l2 - ref_l2) / max(ref_l2, 1e-12))
    worst_sum = max(worst_sum, abs(value.sum() - float(fx[f'step/{key}/sum']))
                    / (np.sqrt(value.size) * max(ref_l2, 1e-12)))
    count += 1
  report(f'{name}/one step checksums', variables=count,
         max_rel_l2_diff=worst_l2, max_scaled_sum_diff=worst_sum)


def main():
  tmp = pathlib.Path('/tmp/parity_report')
  tmp.mkdir(exist_ok=True)
  for name in test_parity_det.CONFIGS:
    det_config(name, tmp)
  for run in sorted(test_original_checkpoints.RUNS):
    restored = test_original_checkpoints.Restored(run)
    restored.restore().assert_consumed()
    outs = restored.model.endpoints(restored.images, training=False)
    report(f'small/{run} restored, training=False vs SavedModel',
           **{k: helpers.max_rel_diff(v.numpy(),
                                      restored.outputs[f'savedmodel/{k}'])
              for k, v in outs.items()})
    restored.restore().assert_consumed()
    outs = restored.model.endpoints(restored.images, training=True)
    report(f'small/{run} restored, training=True vs SavedModel',
           **{k.split('/')[1]: helpers.max_rel_diff(
               outs[k.split('/')[1]].numpy(), restored.outputs[k])
              for k in restored.outputs.files
              if k.startswith('savedmodel_trainable/')})
  det = np.load(test_parity_det.conftest.FIXTURES_DET / 'numerics.npz')
  worst = 0.
  for norm in (0, 1):
    for t in (0.5, 0.1):
      loss, logits, _ = objective.add_contrastive_loss(
          tf.constant(det['contrast/hidden']), bool(norm), t)
      worst = max(worst, abs(float(loss) - det[f'contrast/hn{norm}_t{t}/loss']),
                  float(np.abs(logits - det[f'contrast/hn{norm}_t{t}/logits_ab']).max()))
  report('NT-Xent single replica, 4 settings (max abs diff)', value=worst)


if __name__ == '__main__':
  main()
