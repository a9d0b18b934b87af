"""ddpm_jax: Denoising Diffusion Probabilistic Models in JAX/Flax, from a laptop to a TPU pod."""

from setuptools import find_packages, setup

# The stack is pinned: these are the versions the test suite runs against.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "tensorflow-cpu==2.21.0",  # tf.data only; accelerators are hidden from TensorFlow.
    "tensorboard==2.21.0",  # clu's summary writers need it and nothing pulls it in.
    "ml_collections==1.1.0",
    "clu==0.0.12",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "scikit-learn==1.9.1",  # Ships the embedded 8x8 digits data set.
    "pillow==13.0.0",
    # Reads diffusers' .safetensors weights: it validates the format (header, offsets, overlaps)
    # itself, and needs no torch (a small Rust wheel).
    "safetensors==0.8.0",
    "matplotlib==3.11.2",  # The rate-distortion plot (Fig. 5): axes and ticks are a library's job.
]

EXTRAS_REQUIRE = {
    "cpu": ["jax[cpu]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda12": ["jax[cuda12]==0.10.2"],
    "cuda13": ["jax[cuda13]==0.10.2"],
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "ruff==0.17.6",
        # The notebooks run top to bottom in the suite.
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        "jupyter_client==8.10.0",
        # The notebooks are generated from their percent-format sources, notebooks/*.py.
        "jupytext==1.19.6",
    ],
    # Optional: the PyTorch peer of `python -m benchmarks.run` (diffusers' UNet2DModel).
    "bench": [
        "torch==2.13.0",
        "diffusers==0.42.1",
    ],
    # The cross-checks against torch and diffusers (importer, exporter, solvers, the benchmarks'
    # peer); CI installs it (.ci/run), ./run_tests.sh without it skips them.
    "test-diffusers": [
        "torch==2.13.0",
        "diffusers==0.42.1",
        "safetensors==0.8.0",
    ],
}

with open("README.md", encoding="utf-8") as f:
    LONG_DESCRIPTION = f.read()

setup(
    name="ddpm_jax",
    version="0.1.0",
    description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) in JAX/Flax.",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["ddpm_jax", "ddpm_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
