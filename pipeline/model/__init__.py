"""The model: the network's settings and rules, and the Keras network built from them."""
