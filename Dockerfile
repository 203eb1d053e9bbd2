# GPU image for training and benchmarks: NVIDIA's PyTorch container (PyTorch, CUDA, cuDNN, NCCL, Triton, apex,
# Transformer Engine, flash-attn) with this package and its VAE, benchmark and test dependencies.
# Contents, versions, what was verified and what was not: docs/docker.md.
#
# One image serves A100 and H100: Triton compiles the kernels at run time for the GPU it runs on (cached in
# ~/.triton), and this package compiles nothing when installed. CUDA_ARCHS only reaches what the build itself
# would compile (flash-attn, should the base lack it):
#   A100 (sm_80):   docker build --build-arg CUDA_ARCHS=8.0 -t maskdit_fast:a100 .
#   H100 (sm_90):   docker build --build-arg CUDA_ARCHS=9.0 -t maskdit_fast:h100 .
#   both (default): docker build -t maskdit_fast .
# Run with --ipc=host: DataLoader workers and NCCL exchange tensors through /dev/shm, which Docker caps at 64 MB:
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it maskdit_fast
FROM nvcr.io/nvidia/pytorch:25.12-py3
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG CUDA_ARCHS="8.0;9.0"
# The base pins every Python package it was built with in this file (release notes, 25.03 and later); every
# install below goes through it, so nothing replaces the container's torch, Triton or CUDA libraries.
ARG PIP_PINS=/etc/pip/constraint.txt

# "Has it" is asked with find_spec, which loads nothing: a build has no GPU driver for a CUDA extension to load.
# DALI: the base's own if it has one, else NVIDIA's CUDA 13 wheel (the version the CI runs in CPU mode).
RUN python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('nvidia.dali') is None)" \
    || pip install --no-cache-dir --constraint "$PIP_PINS" nvidia-dali-cuda130==2.4.0

# flash-attn (FA2): the base's own if it has one, else compiled against the base's torch for CUDA_ARCHS
# (no prebuilt wheel matches an NGC torch build; compiling takes tens of minutes per architecture).
RUN python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('flash_attn') is None)" \
    || FLASH_ATTN_CUDA_ARCHS="$(echo "$CUDA_ARCHS" | tr -d .)" TORCH_CUDA_ARCH_LIST="$CUDA_ARCHS" \
       FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=8 \
       pip install --no-cache-dir --no-build-isolation --constraint "$PIP_PINS" flash-attn==2.8.3.post2

# An unprivileged user with a fixed id (docs/docker.md: running as your own id for mounted folders).
RUN groupadd --gid 10001 maskdit \
    && useradd --no-log-init --create-home --shell /bin/bash --uid 10001 --gid 10001 maskdit
WORKDIR /workspace/maskdit_fast
RUN chown 10001:10001 /workspace/maskdit_fast

COPY --chown=10001:10001 setup.py pyproject.toml README.md train.py sample.py ./
COPY --chown=10001:10001 maskdit_fast ./maskdit_fast
COPY --chown=10001:10001 kernels ./kernels
COPY --chown=10001:10001 configs ./configs
COPY --chown=10001:10001 benchmarks ./benchmarks
COPY --chown=10001:10001 scripts ./scripts
COPY --chown=10001:10001 tests ./tests

# The test extra minus its DALI (CUDA 12 build; DALI is above) and hadolint (the linter of this file);
# tests/test_dockerfile.py keeps this list equal to setup.py's. The build fails if torch or Triton changed.
RUN before="$(python -c 'import torch, triton; print(torch.__version__, triton.__version__)')" \
    && pip install --no-cache-dir --constraint "$PIP_PINS" -e ".[vae,bench]" \
       "pytest>=7" "pytest-benchmark>=4" scipy matplotlib "diffusers>=0.25" tensorboard wandb \
    && test "$(python -c 'import torch, triton; print(torch.__version__, triton.__version__)')" = "$before"

USER 10001:10001
CMD ["python", "train.py"]
