"""Data: dataset specs, their sources read into arrays, tf.data input, image decoding and header bounds."""
