"""A TF1-style SavedModel (graph, session, signature defs) with predict, classify
and regress signatures, built the way TF1 Estimator-era models were exported."""

import tensorflow as tf

CLASS_LABELS = (b"negative", b"positive")
WEIGHTS = (2.0, -1.0)
BIAS = 0.5


def build_tf1_saved_model(path: str) -> None:
    """y = 2*x0 - x1 + 0.5 over tf.Examples with a float feature "x" of length 2.

    - serving_default (predict): inputs {"x": float [None, 2]} -> {"y": float [None, 1]}
    - classify (classify): serialized tf.Example -> classes [None, 2], scores [None, 2]
      (score of "positive" is sigmoid(y))
    - regress (regress): serialized tf.Example -> outputs [None, 1] = y
    """
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        serialized = v1.placeholder(tf.string, [None], name="tf_example")
        parsed = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([2], tf.float32)})
        x_in = v1.placeholder(tf.float32, [None, 2], name="x")
        weights = v1.get_variable("weights", initializer=tf.constant([[WEIGHTS[0]], [WEIGHTS[1]]]))
        bias = v1.get_variable("bias", initializer=tf.constant(BIAS))

        def linear(x):
            return tf.matmul(x, weights) + bias

        y_examples = linear(parsed["x"])
        positive = tf.sigmoid(y_examples)
        scores = tf.concat([1.0 - positive, positive], axis=1)
        classes = tf.tile(tf.constant([list(CLASS_LABELS)]), [tf.shape(scores)[0], 1])
        signatures = {
            "serving_default": v1.saved_model.predict_signature_def(inputs={"x": x_in}, outputs={"y": linear(x_in)}),
            "classify": v1.saved_model.classification_signature_def(serialized, classes, scores),
            "regress": v1.saved_model.regression_signature_def(serialized, y_examples),
        }
        save_v1(path, signatures)


def save_v1(path: str, signatures: dict) -> None:
    """The current graph's variables, initialised, and `signatures` as a SavedModel tagged "serve"."""
    v1 = tf.compat.v1
    builder = v1.saved_model.Builder(path)
    with v1.Session() as session:
        session.run(v1.global_variables_initializer())
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signatures)
    builder.save()


def example(x0: float, x1: float) -> tf.train.Example:
    return tf.train.Example(features=tf.train.Features(
        feature={"x": tf.train.Feature(float_list=tf.train.FloatList(value=[x0, x1]))}))
