"""fastemp: the fastest correct trainer for EMP-SSL.

Triton kernels live in the top-level folder kernels/, configs in configs/ and benchmarks in
benchmarks/; all three are installed inside the fastemp namespace (fastemp.kernels,
fastemp.configs, fastemp.benchmarks) so the package never ships a top-level module of its own
beside `fastemp`.

DALI: the default dependency is the CUDA 13 build (nvidia-dali-cuda130) on Linux x86-64. A CUDA 12
machine swaps it: `pip uninstall -y nvidia-dali-cuda130 && pip install nvidia-dali-cuda120`.
"""

from setuptools import setup

LINUX_X86 = 'platform_system == "Linux" and platform_machine == "x86_64"'

setup(
    name="fastemp",
    version="0.1.0",
    description="The fastest correct trainer for EMP-SSL (self-supervised learning in one epoch)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "fastemp",
        "fastemp.check",
        "fastemp.data",
        "fastemp.patches",
        "fastemp.kernels",
        "fastemp.configs",
        "fastemp.benchmarks",
    ],
    package_dir={
        "fastemp": "fastemp",
        "fastemp.kernels": "kernels",
        "fastemp.configs": "configs",
        "fastemp.benchmarks": "benchmarks",
    },
    package_data={"fastemp.configs": ["*.yaml"], "fastemp.benchmarks": ["*.sh"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "pillow>=9.1",  # image folders: their checks and their one decode (docs/data.md); the pillow patch backend
        "safetensors>=0.4",  # fastemp export (docs/export.md)
        f"triton>=3.2; {LINUX_X86}",
        f"nvidia-dali-cuda130>=2.0; {LINUX_X86}",
    ],
    extras_require={
        "plot": ["matplotlib>=3.6"],
        "tensorboard": ["tensorboard>=2.10"],  # train.loggers=tensorboard
        "dev": ["pytest>=7", "matplotlib>=3.6", "ruff==0.17.6", "tensorboard>=2.10"],
    },
    entry_points={"console_scripts": ["fastemp = fastemp.cli:main"]},
)
