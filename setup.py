"""Build and install the ``qjl_kernel`` package.

    pip install --no-build-isolation -e .

Pure Python today: the ops run through their PyTorch references (``qjl_kernel/reference.py``).
The CUDA extension ``qjl_kernel._C`` (sources in ``qjl_kernel/csrc/``) is added to
``ext_modules`` below when it lands.
"""

from setuptools import setup

ext_modules = []  # CUDA extension qjl_kernel._C goes here.

setup(
    name="qjl_kernel",
    version="0.1.0",
    description="QJL: 1-bit quantized JL transform for KV cache quantization (ops + references)",
    packages=["qjl_kernel"],
    python_requires=">=3.10",
    ext_modules=ext_modules,
)
