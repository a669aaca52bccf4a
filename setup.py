"""mgas-jax: multi-granularity architecture search (MGAS) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="mgas-jax",
    version="0.1.0",
    description="MGAS: multi-granularity differentiable architecture search in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mgas_jax", "mgas_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-datasets>=4.9.8,<4.10",
        "array_record>=0.7",
        "ml-collections>=1.0,<2",
        "chex>=0.1.89,<0.2",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scikit-learn>=1.4",   # the bundled 8x8 digits data set, the offline default
        "scipy>=1.10",         # Student t quantiles of the studies' intervals (stats.py); scikit-learn needs it too
        "tqdm>=4.66",          # progress bars
        "tensorboardX>=2.6",   # TensorBoard events without TensorFlow
        "matplotlib>=3.8",     # reports: cell drawings, sparsity and Pareto plots
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"],
        "bench": ["torch==2.13.0"],
    },
)
