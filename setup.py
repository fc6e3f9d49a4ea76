from setuptools import find_packages, setup


def requirements() -> list[str]:
    with open("requirements.txt") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="llama",
    version="0.1.0",
    description="Meta's Llama 2 and Llama 3.x inference API, faithful to its checkpoints and runnable anywhere",
    packages=find_packages(include=["llama", "llama.*"]),
    package_data={"llama": ["csrc/*.cpp", "csrc/*.h"]},
    python_requires=">=3.10",
    install_requires=requirements(),
    entry_points={"console_scripts": ["llama=llama.cli:main"]},
)
