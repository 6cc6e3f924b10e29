"""LARS: layer-wise adaptive rate scaling (You, Gitman and Ginsburg, 2017).

Each layer's step is scaled by a trust ratio eeta * ||w|| / ||g|| so that
very large batches train stably. A `tf_keras` legacy optimizer, as in the
original: its momentum slots are checkpointed as
`<variable key>/.OPTIMIZER_SLOT/optimizer/Momentum`, and it works under any
`tf.distribute` strategy (gradients arrive already all-reduced).
"""
import re

import tensorflow as tf
import tf_keras as keras

EETA_DEFAULT = 0.001


class LARSOptimizer(keras.optimizers.legacy.Optimizer):
  """LARS with (Nesterov) momentum and decoupled-by-name weight decay.

  Args:
    learning_rate: float or a LearningRateSchedule.
    momentum: momentum coefficient.
    use_nesterov: Nesterov momentum.
    weight_decay: L2 coefficient added to the gradient (w <- g + wd * w).
    exclude_from_weight_decay: regexes; a variable whose name matches one gets
      no weight decay.
    exclude_from_layer_adaptation: regexes for no trust-ratio scaling; None
      means the weight-decay list.
    classic_momentum: True applies the scaled rate inside the momentum
      (v = m v + lr g); False applies it to the momentum afterwards.
    eeta: trust coefficient.
  """

  def __init__(self, learning_rate, momentum=0.9, use_nesterov=False,
               weight_decay=0.0, exclude_from_weight_decay=None,
               exclude_from_layer_adaptation=None, classic_momentum=True,
               eeta=EETA_DEFAULT, name='LARSOptimizer'):
    super().__init__(name)
    self._set_hyper('learning_rate', learning_rate)
    self.momentum = momentum
    self.weight_decay = weight_decay
    self.use_nesterov = use_nesterov
    self.classic_momentum = classic_momentum
    self.eeta = eeta
    self.exclude_from_weight_decay = exclude_from_weight_decay
    self.exclude_from_layer_adaptation = (
        exclude_from_layer_adaptation or exclude_from_weight_decay)

  def _create_slots(self, var_list):
    for var in var_list:
      self.add_slot(var, 'Momentum')

  def _trust_ratio(self, param, direction):
    """eeta * ||w|| / ||d||, or 1 where either norm is zero."""
    w_norm = tf.norm(param, ord=2)
    d_norm = tf.norm(direction, ord=2)
    return tf.where(
        w_norm > 0,
        tf.where(d_norm > 0, self.eeta * w_norm / d_norm, 1.0), 1.0)

  def _resource_apply_dense(self, grad, param, apply_state=None):
    if grad is None or param is None:
      return tf.no_op()
    device, dtype = param.device, param.dtype.base_dtype
    coefficients = ((apply_state or {}).get((device, dtype)) or
                    self._fallback_apply_state(device, dtype))
    learning_rate = coefficients['lr_t']
    name = param.name
    momentum = self.get_slot(param, 'Momentum')
    adapt = self._do_layer_adaptation(name)
    if self._use_weight_decay(name):
      grad += self.weight_decay * param

    if self.classic_momentum:
      scaled_lr = learning_rate
      if adapt:
        scaled_lr = learning_rate * self._trust_ratio(param, grad)
      next_momentum = self.momentum * momentum + scaled_lr * grad
      update = (self.momentum * next_momentum + scaled_lr * grad
                if self.use_nesterov else next_momentum)
      next_param = param - update
    else:
      next_momentum = self.momentum * momentum + grad
      update = (self.momentum * next_momentum + grad
                if self.use_nesterov else next_momentum)
      scaled_lr = learning_rate
      if adapt:
        scaled_lr = self._trust_ratio(param, update) * learning_rate
      next_param = param - scaled_lr * update

    return tf.group(param.assign(next_param, use_locking=False),
                    momentum.assign(next_momentum, use_locking=False))

  def _resource_apply_sparse(self, grad, handle, indices, apply_state=None):
    dense = tf.math.unsorted_segment_sum(grad, indices,
                                         tf.shape(handle)[0])
    return self._resource_apply_dense(dense, handle, apply_state)

  def _use_weight_decay(self, param_name):
    """Whether `param_name` gets weight decay."""
    if not self.weight_decay:
      return False
    return not _matches_any(self.exclude_from_weight_decay, param_name)

  def _do_layer_adaptation(self, param_name):
    """Whether `param_name` gets its rate scaled by the trust ratio."""
    return not _matches_any(self.exclude_from_layer_adaptation, param_name)

  def get_config(self):
    config = super().get_config()
    config.update({
        'learning_rate': self._serialize_hyperparameter('learning_rate'),
        'momentum': self.momentum,
        'classic_momentum': self.classic_momentum,
        'weight_decay': self.weight_decay,
        'eeta': self.eeta,
        'use_nesterov': self.use_nesterov,
        'exclude_from_weight_decay': self.exclude_from_weight_decay,
        'exclude_from_layer_adaptation': self.exclude_from_layer_adaptation,
    })
    return config


def _matches_any(patterns, name):
  return any(re.search(p, name) is not None for p in (patterns or ()))
