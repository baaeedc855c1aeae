# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target trainer -t accresnet-trainer .   # accresnet train/export/classify/serve
#   docker build --target serving -t accresnet-serving .   # the official TF Serving with our configs
# GPU variants, under names of their own so that they cannot pass for the CPU images
# (k8s/overlays/gpu deploys these names, no other overlay does):
#   docker build --target trainer --build-arg TRAINER_BASE=tensorflow/tensorflow:2.21.0-gpu -t accresnet-trainer-gpu .
#   docker build --target serving --build-arg TF_SERVING_TAG=2.21.0-gpu -t accresnet-serving-gpu .

ARG TRAINER_BASE=python:3.11-slim-bookworm
ARG TF_SERVING_TAG=2.21.0

# --- trainer -------------------------------------------------------------------------------
FROM ${TRAINER_BASE} AS trainer

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/tmp

WORKDIR /opt/accresnet
# Dependencies first, from pyproject.toml alone (an empty README.md stands in for the package's
# long description), so that changes to the code or the README do not reinstall TensorFlow;
# pip's in-tree build (build/, *.egg-info) goes with the layer.
# --build-arg BFLOAT16_KERNELS=yes also compiles the project's opt-in bfloat16 kernels
# (--project-bfloat16-kernels, pipeline/kernels/bfloat16.py) for the TensorFlow it installed, then
# removes what only the compiling needed in the same layer: g++, binutils and TensorFlow's C++
# headers (430 MB). By default the image has neither the kernels nor a compiler.
ARG BFLOAT16_KERNELS=no
ENV ACCRESNET_BFLOAT16_KERNELS_DIR=/opt/accresnet/kernels
COPY pyproject.toml ./
COPY pipeline/__init__.py pipeline/cache.py pipeline/cpu.py pipeline/
COPY pipeline/kernels/ pipeline/kernels/
COPY serving/__init__.py serving/
# Any g++ of the base's distribution will do: not pinned, and gone again at the end of the layer with
# all it brought (binutils too, which a Debian python3 only suggests).
# hadolint ignore=DL3008
RUN touch README.md && pip install --no-cache-dir . && pip uninstall --yes accresnet \
    && if [ "$BFLOAT16_KERNELS" = yes ]; then \
         apt-get update && apt-get install --yes --no-install-recommends g++ \
         && python3 -m pipeline.kernels.bfloat16 --prebuild "$ACCRESNET_BFLOAT16_KERNELS_DIR" \
         && apt-get purge --yes --auto-remove -o APT::AutoRemove::SuggestsImportant=false g++ \
         && apt-get clean && rm -rf /var/lib/apt/lists/*; \
       elif [ "$BFLOAT16_KERNELS" != no ]; then echo "BFLOAT16_KERNELS is yes or no" >&2; exit 2; fi \
    && rm -rf build accresnet.egg-info README.md \
    && rm -r "$(python3 -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("tensorflow").origin))')/include"
COPY README.md ./
COPY pipeline/ pipeline/
COPY serving/ serving/
RUN pip install --no-cache-dir --no-deps . && rm -rf build accresnet.egg-info \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp accresnet

USER 10001:10001
ENTRYPOINT ["accresnet"]
CMD ["--help"]

# --- serving ---------------------------------------------------------------------------------
FROM tensorflow/serving:${TF_SERVING_TAG} AS serving

# A model baked in at build time (an export base with numbered versions), if any, and the
# model config beside it. A volume mounted at /models (Kubernetes) brings its own, which
# `accresnet push`, `promote` and `rollback` write.
ARG MODEL_DIR=serving/models
COPY serving/config/batching.config serving/config/monitoring.config /config/
COPY serving/config/models.config /models/models.config
COPY ${MODEL_DIR} /models/accresnet/

USER 10001:10001
EXPOSE 8500 8501
ENTRYPOINT ["/usr/bin/tensorflow_model_server"]
CMD ["--port=8500", "--rest_api_port=8501", \
     "--model_config_file=/models/models.config", "--file_system_poll_wait_seconds=30", \
     "--model_config_file_poll_wait_seconds=30", "--allow_version_labels_for_unavailable_models=true", \
     "--enable_batching=true", "--batching_parameters_file=/config/batching.config", \
     "--monitoring_config_file=/config/monitoring.config", "--grpc_max_threads=64"]
