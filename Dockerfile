# GPU image for training and benchmarks: CUDA PyTorch + Triton, this package with its test extras.
# Build: docker build -t maskdit_fast .   Run: docker run --gpus all --ipc=host -it maskdit_fast
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel

WORKDIR /workspace/maskdit_fast
COPY setup.py pyproject.toml README.md ./
COPY maskdit_fast ./maskdit_fast
COPY kernels ./kernels
COPY configs ./configs
COPY benchmarks ./benchmarks
COPY tests ./tests
COPY train.py sample.py ./
RUN pip install --no-cache-dir -e ".[test,vae,bench]"

CMD ["python", "train.py"]
