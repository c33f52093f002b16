from pathlib import Path

from setuptools import find_packages, setup

requirements = [line.split("#")[0].strip()
                for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()]

setup(
    name="scalecrafter",
    version="0.1.0",
    description="Tuning-free higher-resolution image generation with Stable Diffusion "
                "(ScaleCrafter), inference only",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.9",
    install_requires=[r for r in requirements if r and not r.startswith("pytest")],  # tests
)
