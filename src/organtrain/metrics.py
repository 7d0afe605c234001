"""Keras metrics organtrain compiles into every model.

`BalancedAccuracy` is the mean of the per-class recalls over the classes present in what
it has seen, streamed over an epoch: Keras reports it as `balanced_accuracy` (training
batches) and `val_balanced_accuracy` (the validation split, after each epoch), so a sweep
can select and stop trials on it (`search.metric: val_balanced_accuracy`, mode max).

Plain accuracy rewards a model that never predicts a rare diagnosis (85 % of the BCCD
crops are red cells: "always red cell" scores 0.85); balanced accuracy gives that model
1/k, one recall of 1 among k classes.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="organtrain")
class BalancedAccuracy(keras.metrics.Metric):
    """Mean recall over the classes present in the labels seen since the last reset:
    scikit-learn's `balanced_accuracy_score` (tested against it).

    Labels are sparse class indices (shape (n,) or (n, 1)); predictions are per-class
    scores (n, num_classes), the prediction being the highest. Two per-class counters
    (images of class c, and those predicted c) are summed over batches and, under a
    tf.distribute strategy, over replicas (aggregation "sum"), so the value is the whole
    split's, not an average of batch values.
    """

    def __init__(self, num_classes: int, name: str = "balanced_accuracy", dtype=None, **kwargs):
        super().__init__(name=name, dtype=dtype, **kwargs)
        if num_classes < 2:
            raise ValueError(f"BalancedAccuracy needs at least 2 classes, got {num_classes}")
        self.num_classes = int(num_classes)
        self.seen = self.add_variable(
            shape=(self.num_classes,), initializer="zeros", aggregation="sum", name="seen"
        )
        self.recalled = self.add_variable(
            shape=(self.num_classes,), initializer="zeros", aggregation="sum", name="recalled"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        predicted = ops.cast(ops.argmax(ops.reshape(y_pred, (-1, self.num_classes)), -1), "int32")
        per_class = ops.one_hot(labels, self.num_classes, dtype=self.dtype)  # (n, k)
        if sample_weight is not None:
            weight = ops.cast(ops.reshape(sample_weight, (-1, 1)), self.dtype)
            per_class = per_class * weight
        right = ops.cast(ops.equal(labels, predicted), self.dtype)
        self.seen.assign_add(ops.sum(per_class, axis=0))
        self.recalled.assign_add(ops.sum(per_class * ops.expand_dims(right, -1), axis=0))

    def result(self):
        present = ops.cast(self.seen > 0, self.dtype)
        recall = self.recalled / ops.maximum(self.seen, 1e-12)  # 0 where absent, then masked
        # No labels seen yet: 0, as Keras' accuracy reports before its first batch.
        return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        self.seen.assign(ops.zeros_like(self.seen))
        self.recalled.assign(ops.zeros_like(self.recalled))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}
