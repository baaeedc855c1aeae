"""A model equivalent to TF Serving's `saved_model_half_plus_two_cpu` test model,
rebuilt here (TF Serving's testdata stays in its repository): a TF1 graph with
y = 0.5 * x + 2, whose predict signature declares x as float [-1, 1].

TF Serving's quickstart POSTs {"instances": [1.0, 2.0, 5.0]} (shape [3], not
the declared [-1, 1]) and gets {"predictions": [2.5, 3.0, 4.5]}: its session
does not check fed tensors against placeholder shapes, and the graph is
elementwise.
"""

import tensorflow as tf

from tf1_model import save_v1


def build_half_plus_two(path: str) -> None:
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        a = v1.get_variable("a", initializer=tf.constant(0.5))
        b = v1.get_variable("b", initializer=tf.constant(2.0))
        x = v1.placeholder(tf.float32, [None, 1], name="x")
        y = tf.add(a * x, b, name="y")
        serialized = v1.placeholder(tf.string, name="tf_example")
        parsed = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})
        y_examples = tf.add(a * parsed["x"], b, name="y_examples")
        signatures = {
            "serving_default": v1.saved_model.predict_signature_def({"x": x}, {"y": y}),
            "classify_x_to_y": v1.saved_model.classification_signature_def(serialized, None, y_examples),
            "regress_x_to_y": v1.saved_model.regression_signature_def(serialized, y_examples),
        }
        save_v1(path, signatures)
