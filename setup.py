from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

# One version, in spoxl/__init__.py (`spoxl --version` prints it).
version = next(line.split('"')[1] for line in (here / "spoxl" / "__init__.py").read_text().splitlines()
               if line.startswith("__version__"))

setup(
    name="spoxl",
    version=version,
    description="Preference fine-tuning (SPO, Diffusion-DPO, MaPO, NCP) of SDXL with DeepSpeed ZeRO and Triton kernels",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["spoxl", "spoxl.*"]),
    # The pretrained toy-world model ships inside the package (spoxl/toy/weights, a diffusers folder).
    package_data={"spoxl": ["resources/*.json"], "spoxl.toy": ["weights/*.json", "weights/*/*", "lrm/*.safetensors", "lrm/*.json", "lrm/*/*"]},
    install_requires=requirements,
    extras_require={"dev": ["pytest", "pytest-timeout"]},
    entry_points={"console_scripts": ["spoxl=spoxl.cli:main"]},
)
