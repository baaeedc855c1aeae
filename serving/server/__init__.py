"""A model server that speaks TF Serving's gRPC and REST APIs.

It serves any SavedModel (TF2 functions or TF1 signatures) from versioned base
paths, as `tensorflow_model_server` does, for machines where that binary is
not at hand. It takes the same flags and configuration files.
"""
