"""itop: dynamic sparse training that is really faster (block-sparse Triton kernels + ITOP)."""
from setuptools import find_packages, setup

CLI = ["tqdm", "matplotlib", "mnist1d", "scikit-learn"]

setup(
    name="itop",
    version="0.1.0",
    description="Dynamic sparse training (In-Time Over-Parameterization) on real block-sparse "
                "kernels: Triton on GPUs, a sparse path on CPUs.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["itop_kernels", "itop_kernels.*", "itop", "itop.*"]),
    # torch itself is installed first (see README): a bare `torch` requirement resolved by pip
    # on a machine without it would pull a multi-GB CUDA build.
    # The library (itop, itop_kernels) needs torch and numpy only.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # The application (itop.app: the `itop` command line, models, data, plots).
        "cli": CLI,
        # Triton runs the GPU kernels, and in tests its interpreter runs them on the CPU.
        # transformers: tests/test_real_models.py builds tiny BERT/GPT-2/Llama models from
        # configs (no download; it pulls no torch). timm and torchvision are not here: they
        # need a torchvision build matching torch, and PyPI's does not import next to the CPU
        # build of torch 2.13.0; their tests skip.
        "test": CLI + ["pytest", "hypothesis", "pytest-benchmark", "triton==3.8.0",
                       "transformers>=4.40"],
        "bench": CLI + ["pytest-benchmark", "triton==3.8.0"],
        # The documentation site: `mkdocs build --strict` (the CLI reference page imports
        # itop.app.cli, the API reference reads the docstrings).
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=0.26"],
    },
    entry_points={"console_scripts": ["itop=itop.app.cli:main"]},
)
