"""Install sdtm_kernels; reference/ and csrc_triton/ go inside the sdtm_kernels namespace."""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def subpackages(source_dir, namespace):
    """Map every package folder under ``source_dir`` to a name under ``namespace``."""
    mapping = {}
    for root, _, files in os.walk(os.path.join(HERE, source_dir)):
        if "__init__.py" in files and "__pycache__" not in root:
            rel = os.path.relpath(root, HERE)
            inner = os.path.relpath(root, os.path.join(HERE, source_dir))
            name = namespace if inner == "." else f"{namespace}.{inner.replace(os.sep, '.')}"
            mapping[name] = rel.replace(os.sep, "/")
    return mapping


package_dir = {}
package_dir.update(subpackages("sdtm_kernels", "sdtm_kernels"))
package_dir.update(subpackages("reference", "sdtm_kernels.reference"))
package_dir.update(subpackages("csrc_triton", "sdtm_kernels.csrc_triton"))

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
    long_description = fh.read()

setup(
    name="sdtm_kernels",
    version="0.1.0",
    description="Fused Triton kernels and a PyTorch reference for SDTM token merging in diffusion transformers",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(package_dir),
    package_dir=package_dir,
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "numpy"],
    extras_require={
        # diffusers (light: huggingface_hub, safetensors, Pillow, ...) for the DiT wrapper tests, which
        # build tiny random models from configs; transformers, torchmetrics and matplotlib for the
        # quality command's end-to-end test (tiny text encoders, PSNR/SSIM, the plot).
        # diffusers >= 0.33: SDTM runs as diffusers hooks; peft and accelerate for the composition
        # tests (LoRA adapters, model CPU offload); pytest-xdist runs the test files on every core.
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "pytest-xdist>=3", "diffusers>=0.33",
                 "transformers>=4.40", "torchmetrics>=1.4", "matplotlib", "peft", "accelerate"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
        "diffusers": ["diffusers>=0.33", "transformers", "accelerate"],
        # python -m sdtm_kernels quality; no torchvision (LPIPS needs it, but PyPI's wheel can pull
        # another torch build: install it yourself next to your torch to get LPIPS)
        "quality": ["diffusers>=0.33", "transformers>=4.40", "torchmetrics>=1.4", "matplotlib"],
    },
    entry_points={"console_scripts": [
        "sdtm-kernels=sdtm_kernels.cli:main",
        "sdtm-bench=sdtm_kernels.cli:bench_main",
    ]},
    classifiers=["Programming Language :: Python :: 3"],
)
