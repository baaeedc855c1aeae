"""Distributed train and evaluation steps around one model and optimizer.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so a training step is a `tf.function` that calls
`strategy.run`, with the loss averaged over the global batch by
`tf.nn.compute_average_loss` and Keras 3 layers, optimizer and metrics
inside. The same steps run on one CPU, N logical CPUs, N GPUs or N workers.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.data import input_pipeline
from pipeline.data.splits import Split
from pipeline.train.distribute import Cluster


class Trainer:
    """Distributed train and evaluation steps around one model and optimizer."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, global_batch: int, jit: bool = False,
                 cluster: Cluster | None = None):
        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.global_batch = global_batch
        self.cluster = cluster or Cluster()
        with strategy.scope():
            self.train_loss = keras.metrics.Mean(name="loss")
            self.train_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
            self.eval_loss = keras.metrics.Mean(name="val_loss")
            self.eval_accuracy = keras.metrics.SparseCategoricalAccuracy(name="val_accuracy")
            # Slots made now, not inside the first traced step: variables
            # created in a tf.function under a strategy break its graph.
            optimizer.build(model.trainable_variables)
        self._moving_statistics = [
            variable for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
            for variable in (layer.moving_mean, layer.moving_variance)
        ]
        self._gradients = tf.function(self._replica_gradients, jit_compile=True) if jit else self._replica_gradients

    def _replica_gradients(self, images, labels):
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            scaled = self.optimizer.scale_loss(loss)
        return tape.gradient(scaled, self.model.trainable_variables), per_example, probabilities

    def _replica_train_step(self, images, labels, stop_vote):
        gradients, per_example, probabilities = self._gradients(images, labels)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        self.train_loss.update_state(per_example)
        self.train_accuracy.update_state(labels, probabilities)
        loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)
        return tf.stack([loss, stop_vote])

    def distribute(self, dataset_fn):
        """`dataset_fn(input_context)` as the input of this strategy's steps.

        On GPUs: tf.data's per-device iterators, which prefetch onto each GPU.
        On CPUs each replica reads its own pipeline on the host instead: those
        per-device iterators start an autotuning thread that this project's
        pipelines turn off, and destroying one waits for that thread's next
        wake-up, up to a minute, at the end of every run and after every
        evaluation; on CPUs their prefetch buys nothing. A worker of several
        has one CPU replica, fed its own pipeline's batches as they are.
        """
        if tf.config.list_logical_devices("GPU"):
            return self.strategy.distribute_datasets_from_function(dataset_fn)
        if self.cluster.is_multi_worker:
            return dataset_fn(tf.distribute.InputContext(self.cluster.num_workers, self.cluster.worker_index,
                                                         self.strategy.num_replicas_in_sync))
        options = tf.distribute.InputOptions(
            experimental_fetch_to_device=False,
            experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA)
        return self.strategy.distribute_datasets_from_function(dataset_fn, options)

    @tf.function
    def train_step(self, iterator, stop_vote: tf.Tensor) -> tf.Tensor:
        """One global step; returns [the batch's mean cross-entropy, the replicas that vote to stop].

        The vote rides on the loss's all-reduce: every worker gets the same sum.
        """
        images, labels = next(iterator)
        per_replica = self.strategy.run(self._replica_train_step, args=(images, labels, stop_vote))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def checkpointed_state(self) -> dict:
        """What a checkpoint holds besides the model and optimizer: the epoch's running
        training metrics, so that an epoch resumed mid-way reports all its steps."""
        return {"train_metrics": [variable.value for metric in (self.train_loss, self.train_accuracy)
                                  for variable in metric.variables]}

    @tf.function
    def sync_batch_norm_statistics(self) -> None:
        """Average the BN moving statistics over replicas and workers.

        Each replica updates its own copy from its own batches (Keras creates
        them with no aggregation), so the copies drift apart. A moving average
        is linear in the batch statistics, so the mean of the copies equals
        what a per-step mean would have produced: syncing once before they
        are read (evaluation, checkpoints) is exact.
        """
        statistics = self._moving_statistics

        def replica_means():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v) for v in statistics])

        means = self.strategy.run(replica_means)
        for variable, mean in zip(statistics, means):
            variable.assign(self.strategy.experimental_local_results(mean)[0])

    def _replica_eval_step(self, images, labels, weights):
        probabilities = self.model(images, training=False)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        self.eval_loss.update_state(per_example, sample_weight=weights)
        self.eval_accuracy.update_state(labels, probabilities, sample_weight=weights)

    @tf.function
    def eval_step(self, iterator) -> None:
        self.strategy.run(self._replica_eval_step, args=next(iterator))

    def evaluate(self, split: Split) -> dict[str, float]:
        """Loss and accuracy over a whole split, every image counted once."""
        dataset = self.distribute(
            lambda context: input_pipeline.eval_dataset(
                split, batch_size=context.get_per_replica_batch_size(self.global_batch),
                global_batch=self.global_batch, input_context=context))
        self.eval_loss.reset_state()
        self.eval_accuracy.reset_state()
        iterator = iter(dataset)
        for _ in range(input_pipeline.eval_steps(len(split), self.global_batch)):
            self.eval_step(iterator)
        return {"loss": float(self.eval_loss.result()), "accuracy": float(self.eval_accuracy.result())}

    def reset_train_metrics(self) -> None:
        self.train_loss.reset_state()
        self.train_accuracy.reset_state()

    def train_metrics(self) -> dict[str, float]:
        return {"loss": float(self.train_loss.result()), "accuracy": float(self.train_accuracy.result())}

    def learning_rate(self) -> float:
        rate = self.optimizer.learning_rate
        return float(rate(self.optimizer.iterations) if callable(rate) else rate)
