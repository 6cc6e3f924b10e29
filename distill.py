r"""SimCLRv2 distillation: a fine-tuned teacher's softened labels train a student.

    python run.py --train_mode=distill --teacher=<SavedModel> \
        --model_dir=/tmp/student --dataset=shapes10 --use_tpu=False \
        --resnet_depth=18 --width_multiplier=0.5 --image_size=32 \
        --train_steps=1000 --optimizer=momentum --learning_rate=0.1 \
        --distill_temperature=1

Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised
Learners", section 2.3: the teacher is fixed; the student minimises

    L_distill = -sum_x sum_y P_T(y|x; tau) log P_S(y|x; tau)        (eq. 2)

with P(y|x; tau) = softmax(logits / tau), on unlabelled images, optionally
mixed with the labelled cross entropy (eq. 3):

    L = -(1 - alpha) sum_(x,y) log P_S(y|x) + alpha * L_distill

(`--distill_alpha`; 1, the default, uses no labels). Sums are means over the
batch here. No tau**2 factor: the paper has none (Hinton et al.'s
distillation and the original's colab multiply by tau**2, which only
rescales the gradients).

The student is this project's `model.Model` (any size: run.py's model flags)
with a classifier of the teacher's width; it sees the images the teacher
sees, augmented as for fine-tuning (random crop and flip). `--checkpoint`
initialises it (e.g. from a pretrained checkpoint), a `--model_dir` with
checkpoints resumes. Writes checkpoints (`ckpt-<step>`, the keys of run.py's,
so `run.py --checkpoint=<model_dir>` reads them), `result.json` and the
student's SavedModel (`saved_model/<step>/`, the released format), and prints
the student's top-1 accuracy (when the teacher's classes are the dataset's)
and its agreement with the teacher on the eval split.

The teacher is any SavedModel in the released format with a supervised head
(`loaded(images, trainable=False)['logits_sup']`): the released SimCLRv2
fine-tuned models, or one exported by run.py (also by its --mode=convert).
This module reads no flags: run.py's `--train_mode=distill` calls `distill`
with its Config; the notebook calls the pieces directly.
"""
import contextlib
import os

from absl import logging
import tensorflow as tf

import checkpoints
import config as config_lib
import data as data_lib
import export
import model as model_lib
import runtime

def soft_cross_entropy(teacher_logits, student_logits, temperature=1.0):
  """Per example -sum_y softmax(t / tau)_y * log softmax(s / tau)_y.

  Args:
    teacher_logits: [B, C]; no gradient flows into them.
    student_logits: [B, C].
    temperature: tau > 0.

  Returns:
    [B] float32.
  """
  teacher_probs = tf.nn.softmax(tf.stop_gradient(teacher_logits) / temperature)
  return tf.nn.softmax_cross_entropy_with_logits(
      labels=teacher_probs, logits=student_logits / temperature)


def distillation_loss(teacher_logits, student_logits, temperature=1.0,
                      labels=None, alpha=1.0):
  """SimCLRv2's distillation loss (eq. 2; eq. 3 with `labels`), batch mean.

  Args:
    teacher_logits: [B, C] logits of the fixed teacher.
    student_logits: [B, C] logits of the student.
    temperature: tau > 0, applied to both before the softmax.
    labels: optional [B, C] one-hot (or soft) ground truth; used only when
      alpha < 1, at temperature 1.
    alpha: weight of the distillation term in [0, 1]; the labelled term
      weighs 1 - alpha.

  Returns:
    Scalar: alpha * mean(soft CE at tau) + (1 - alpha) * mean(CE with labels).
  """
  if temperature <= 0:
    raise ValueError(f'temperature={temperature}: expected a positive number.')
  if not 0 <= alpha <= 1:
    raise ValueError(f'alpha={alpha}: expected a weight in [0, 1].')
  loss = alpha * tf.reduce_mean(
      soft_cross_entropy(teacher_logits, student_logits, temperature))
  if alpha < 1:
    if labels is None:
      raise ValueError(f'alpha={alpha} < 1 weighs a labelled term: pass '
                       'labels.')
    loss += (1 - alpha) * tf.reduce_mean(
        tf.nn.softmax_cross_entropy_with_logits(labels=labels,
                                                logits=student_logits))
  return loss


def load_teacher(path):
  """(loaded SavedModel, number of classes); raises CheckpointError (one line)."""
  if not checkpoints.is_saved_model(path):
    raise checkpoints.CheckpointError(
        f'--teacher={path}: not a SavedModel directory (no saved_model.pb); '
        'pass the saved_model/ directory of a fine-tuned model.')
  teacher = tf.saved_model.load(path)
  outputs = teacher(tf.zeros([1, 32, 32, 3]), trainable=False)
  if 'logits_sup' not in outputs:
    raise checkpoints.CheckpointError(
        f'--teacher={path}: the SavedModel has no supervised head '
        "('logits_sup'); distil from a fine-tuned model.")
  return teacher, int(outputs['logits_sup'].shape[-1])


def teacher_logits(teacher, images):
  """The fixed teacher's logits [B, C] (batch norm in inference mode)."""
  return tf.stop_gradient(teacher(images, trainable=False)['logits_sup'])


def make_distill_step(student, teacher, optimizer, config, temperature=1.0,
                      alpha=1.0, strategy=None):
  """Returns `step(images, labels) -> terms`, run inside a replica.

  Args:
    student: a `model.Model` with train_mode='finetune' (returns logits).
    teacher: a loaded SavedModel (see `teacher_logits`).
    optimizer: updates the student's trainable variables.
    config: the student's `Config` (weight decay, precision and XLA as in
      runtime.make_step, which this builds on).
    temperature, alpha: see `distillation_loss`.
    strategy: the distribution strategy, to scale the loss per replica.

  The returned terms: `total_loss` (distillation + weight decay),
  `distill_loss` (the soft cross entropy, unweighted), `supervised_loss`
  (with labels), `weight_decay` and `agreement` (fraction of the batch whose
  student top-1 is the teacher's).
  """
  def loss_terms(images, labels_and_target):
    labels, target = labels_and_target
    _, logits = student(images, training=True)
    weight_decay = model_lib.add_weight_decay(student, config)
    return {
        'total_loss': distillation_loss(target, logits, temperature, labels,
                                        alpha) + weight_decay,
        'distill_loss': tf.reduce_mean(
            soft_cross_entropy(target, logits, temperature)),
        'supervised_loss': tf.reduce_mean(
            tf.nn.softmax_cross_entropy_with_logits(labels, logits)),
        'weight_decay': weight_decay,
        'agreement': agreement(target, logits),
    }

  update = runtime.make_step(student, optimizer, config, strategy,
                              loss_terms)

  def step(images, labels):
    # The teacher runs outside the gradient tape: none of its activations
    # are kept for the backward pass.
    return update(images, (labels, teacher_logits(teacher, images)))

  return step


def agreement(teacher_logits_, student_logits, mask=None):
  """Mean over the batch (weighted by `mask`) of top-1 equality."""
  same = tf.cast(tf.equal(tf.argmax(teacher_logits_, -1),
                          tf.argmax(student_logits, -1)), tf.float32)
  if mask is None:
    return tf.reduce_mean(same)
  return tf.reduce_sum(same * mask) / tf.maximum(tf.reduce_sum(mask), 1.)


def evaluate(student, teacher, dataset, steps=None, with_labels=True):
  """Student accuracy, teacher accuracy and their top-1 agreement.

  Args:
    student: a `model.Model` (finetune mode).
    teacher: a loaded SavedModel.
    dataset: eval batches `(images, {'labels': one-hot, 'mask': [B]})` as
      data.build_input_fn gives (padding masked out), not distributed.
    steps: batches to read (None: the whole dataset).
    with_labels: whether the labels are the teacher's classes (else only
      the agreement is reported).

  Returns:
    {'agreement', 'student_top_1_accuracy', 'teacher_top_1_accuracy',
     'teacher_class_frequency_max', 'num_examples'}; accuracies only with
    labels. `teacher_class_frequency_max` is the share of the teacher's most
    frequent prediction: what a student predicting one class would agree.
  """
  @tf.function
  def batch_counts(images, onehot, mask):
    target = teacher_logits(teacher, images)
    _, logits = student(images, training=False)
    truth = tf.argmax(onehot, -1)
    predicted_t = tf.argmax(target, -1)
    hits = lambda pred: tf.reduce_sum(
        tf.cast(tf.equal(pred, truth), tf.float32) * mask)
    return {'same': tf.reduce_sum(tf.cast(tf.equal(
                predicted_t, tf.argmax(logits, -1)), tf.float32) * mask),
            'student_hits': hits(tf.argmax(logits, -1)),
            'teacher_hits': hits(predicted_t),
            'teacher_classes': tf.math.unsorted_segment_sum(
                mask, predicted_t, tf.shape(target)[-1]),
            'count': tf.reduce_sum(mask)}

  totals = None
  for i, (images, labels) in enumerate(dataset):
    if steps is not None and i >= steps:
      break
    counts = batch_counts(images, labels['labels'], labels['mask'])
    totals = counts if totals is None else {
        k: totals[k] + counts[k] for k in counts}
  count = float(totals['count'])
  result = {'agreement': float(totals['same']) / count,
            'teacher_class_frequency_max':
                float(tf.reduce_max(totals['teacher_classes'])) / count,
            'num_examples': int(count)}
  if with_labels:
    result['student_top_1_accuracy'] = float(totals['student_hits']) / count
    result['teacher_top_1_accuracy'] = float(totals['teacher_hits']) / count
  return result


def distill(cfg):
  """Trains a student on `cfg.dataset` from `cfg.teacher`, evaluates,
  exports; the runtime's loop (runtime.train) does the training, so resuming,
  stop requests, divergence and several workers behave as in pretraining.

  Args:
    cfg: the run's `Config` with train_mode='distill': the student is built
      from its model flags as a fine-tuning model (encoder and classifier,
      all trained); `teacher`, `distill_temperature` and `distill_alpha`
      (see `distillation_loss`).

  Returns:
    The evaluation dict (see `evaluate`) plus `global_step`, or None when
    stopped by a signal before the last step.
  """
  cfg = cfg.validate()
  temperature, alpha = cfg.distill_temperature, cfg.distill_alpha
  cfg = cfg.replace(train_mode='finetune').validate()
  source = data_lib.source_for(cfg)
  num_train = source.num_examples(cfg.train_split)
  source.num_examples(cfg.eval_split)  # fails early if the split is absent
  strategy = runtime.prepare(cfg)
  with runtime.output_dir(cfg, strategy) as out_dir:
    return _distill(cfg, source, num_train, temperature, alpha, strategy,
                    out_dir)


def _distill(cfg, source, num_train, temperature, alpha, strategy, out_dir):
  """`distill` once model_dir is held: teacher, student, training, result."""
  # Several workers: the teacher stays a plain (per-process) copy; loading it
  # under MultiWorkerMirroredStrategy's scope makes its restored functions
  # refuse to run ("a graph generated from the cross-replica context").
  with (contextlib.nullcontext() if runtime.is_multi_worker(strategy)
        else strategy.scope()):
    teacher, num_classes = load_teacher(cfg.teacher)
  with_labels = num_classes == source.num_classes
  if alpha < 1 and not with_labels:
    raise config_lib.ConfigError(
        f'--distill_alpha={alpha} uses the dataset labels, but the teacher '
        f'has {num_classes} classes and {cfg.dataset} {source.num_classes}; '
        'use --distill_alpha=1.')
  if not with_labels:
    logging.info('Teacher has %d classes, %s has %d: distilling without '
                 'labels, reporting agreement only.', num_classes,
                 cfg.dataset, source.num_classes)
  student = runtime.build_model(cfg, num_classes, strategy)
  logging.info('Student: ResNet-%d width %s, %d parameters; teacher %s',
               cfg.resnet_depth, cfg.width_multiplier,
               sum(int(tf.size(v)) for v in student.trainable_variables),
               cfg.teacher)
  # A teacher of other classes than the dataset's: labels only masked out.
  relabelled = source if with_labels else _Relabelled(source, num_classes)
  with strategy.scope():
    schedule = model_lib.WarmUpAndCosineDecay(cfg.learning_rate, num_train,
                                              cfg)
    optimizer = model_lib.build_optimizer(schedule, cfg)
  names = ['total_loss', 'distill_loss', 'weight_decay', 'agreement']
  if with_labels:
    names.insert(2, 'supervised_loss')
  step_fn = make_distill_step(student, teacher, optimizer, cfg, temperature,
                              alpha, strategy)
  _, finished = runtime.train(
      cfg, strategy, student, optimizer, schedule, step_fn, names,
      relabelled, num_train, out_dir, summary_prefix='distill/')
  if not finished:
    return None
  step = int(optimizer.iterations.numpy())  # the weights evaluated
  eval_data = data_lib.build_input_fn(relabelled, cfg.eval_batch_size,
                                      False, cfg)()
  result = evaluate(student, teacher, eval_data,
                    steps=cfg.eval_steps or None, with_labels=with_labels)
  result['global_step'] = step
  logging.info('Distillation results: %s', result)
  if runtime.is_chief(strategy):
    runtime.write_json(os.path.join(cfg.model_dir, 'result.json'), result)
  # Every worker exports (the others to their temporary out_dir).
  export.export_and_rotate(student, out_dir, step, cfg.keep_hub_module_max)
  return result


class _Relabelled:
  """A source whose labels are one-hot over the teacher's classes, all zero.

  Distilling from a teacher of other classes (an ImageNet model on flowers)
  needs no labels; the pipeline still makes one-hot vectors, and they must
  have the student's width for the (zero-weighted) supervised term.
  """

  def __init__(self, source, num_classes):
    self._source = source
    self.num_classes = num_classes
    self.name = source.name
    self.fixed_size = getattr(source, 'fixed_size', False)

  def num_examples(self, split):
    return self._source.num_examples(split)

  def as_dataset(self, split, shuffle_files=False, input_context=None,
                 seed=None):
    dataset = self._source.as_dataset(split, shuffle_files=shuffle_files,
                                      input_context=input_context, seed=seed)
    # -1 is one-hot encoded as all zeros.
    return dataset.map(lambda ex: dict(ex, label=tf.constant(-1, tf.int64)))
