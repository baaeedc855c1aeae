"""FLOPs of the network, counted from its traced graph (every shape is static there).

2 x multiply-adds of every convolution and of the classifier; BN, ReLU and
additions are left out (they move memory, they hardly compute). Training
costs 3 forward passes: the gradients with respect to the inputs and to the
weights each cost about one.
"""

from __future__ import annotations

import re

import keras
import tensorflow as tf

from pipeline.model.architecture import ModelConfig
from pipeline.model.network import build_model


def layer_key(op_name: str) -> str:
    """An op's layer path without the model's name, the `_1` suffixes that each call adds
    and the gradient tape's scope, so that a convolution and its gradients share one key:
    `gradient_tape/accumulated_resnet32_1/stage1_block2_1/branch_1/conv1_1/convolution/Conv2DBackpropFilter`
    -> `stage1_block2/branch/conv1`."""
    parts = [re.sub(r"_\d+$", "", part) for part in op_name.split("/")]
    parts = [part for part in parts if part not in ("gradient_tape", "convolution", "MatMul")
             and not part.startswith(("Conv2D", "MatMul_"))]
    return "/".join(parts[1:])


def forward_flops(model: keras.Model, batch: int) -> dict[str, int]:
    """FLOPs of each convolution and matmul of one forward pass of `batch` images, by layer_key."""
    forward = tf.function(lambda images: model(images, training=False))
    graph = forward.get_concrete_function(tf.TensorSpec([batch, 32, 32, 3], tf.uint8)).graph
    flops = {}
    for op in graph.get_operations():
        if op.type == "Conv2D":
            kernel_h, kernel_w, inputs, _ = op.inputs[1].shape
            flops[layer_key(op.name)] = 2 * op.outputs[0].shape.num_elements() * kernel_h * kernel_w * inputs
        elif op.type == "MatMul":
            flops[layer_key(op.name)] = 2 * op.inputs[0].shape.num_elements() * op.outputs[0].shape[-1]
    return flops


def training_flops_per_image(config: ModelConfig) -> float:
    """3 x the forward pass's FLOPs, per image."""
    return 3.0 * sum(forward_flops(build_model(config), 1).values())
