"""Install RSAM. One compiled part, optional (RSAM works, slower, without it):

  rsam._C    CUDA: the connected-components op (rsam.ops); built when a CUDA toolkit is found; without it
             rsam.ops.connected_components falls back to the CPU.
Dataset files are decoded by maintained libraries only (PIL, simplejpeg, pycocotools): nothing else is compiled.

Environment switches:
  RSAM_BUILD_CUDA=0          never build rsam._C (default: build when a CUDA toolkit is found)
  RSAM_BUILD_ALLOW_ERRORS=0  a failed extension build fails the install (default 1: warn and go on)
  CUDA_HOME                  CUDA toolkit root (default: found from nvcc on PATH or /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST       GPU architectures to compile for, e.g. "8.0;9.0" (A100, H100/H200);
                             default: the visible GPUs, or DEFAULT_CUDA_ARCHS when none is visible.
"""
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

BUILD_CUDA = os.environ.get("RSAM_BUILD_CUDA", "1") == "1"
ALLOW_ERRORS = os.environ.get("RSAM_BUILD_ALLOW_ERRORS", "1") == "1"

REQUIRES = [
    "torch>=2.6",
    "torchvision>=0.21",
    "transformers>=4.40",
    "tokenizers>=0.19",
    "hydra-core>=1.3.2",
    "omegaconf>=2.3",
    "iopath>=0.1.10",
    "pycocotools>=2.0.7",
    "numpy>=1.24",
    "pillow>=9.4",
    "simplejpeg>=1.7",  # libjpeg-turbo straight into numpy: dataset JPEGs without PIL's copies (pictures.py)
    "tensorboard>=2.14",
    "tqdm>=4.66",
    "safetensors>=0.4",
]
EXTRAS = {
    "dev": ["pytest>=7", "scipy>=1.10", "opencv-python-headless>=4.8", "peft>=0.13",
            "huggingface_hub>=0.20", "rasterio>=1.3"],
    "lora": ["peft>=0.13"],  # finetune.lora (rsam/finetune.py)
    "slurm": ["submitit>=1.5"],
    "hub": ["huggingface_hub>=0.20", "safetensors>=0.4"],  # push_to_hub / from_pretrained("user/name")
    "geo": ["rasterio>=1.3"],  # GeoTIFF in, georeferenced masks out (rsam-predict)
    "ui": ["gradio>=6.31,<7"],  # rsam-ui web demo (rsam/tools/ui.py)
}


# Compiled when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (e.g. a build node): Turing,
# Ampere (sm_80 code also runs on 8.6 / 8.7 / 8.9), Hopper, and compute_90 PTX that the driver
# compiles for newer GPUs (Blackwell) on first use. The kernels are small: ~10 s per architecture.
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def find_cuda_home():
    """The CUDA toolkit root, or None.

    torch guesses the root as the parent of the folder holding ``nvcc``; that is wrong when the
    ``nvcc`` on PATH is a wrapper script (e.g. /usr/local/bin/nvcc), so look for the headers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


WITHOUT = {  # what a user loses when an extension is not built
    "rsam._C": "rsam.ops.connected_components falls back to the CPU",
}


def build_failed(name, message):
    bar = "!" * 78
    print(f"\n{bar}\nWARNING: the extension {name} is not built:\n  {message}\n"
          f"RSAM works without it: {WITHOUT[name]}.\n"
          "Set RSAM_BUILD_ALLOW_ERRORS=0 to make this an error.\n"
          f"{bar}\n", file=sys.stderr)


def cuda_extensions():
    """([rsam._C], torch's BuildExtension) when the extension should be built, else ([], None)."""
    if not BUILD_CUDA:
        return [], None
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print(f"rsam._C not built: no CUDA toolkit found (set CUDA_HOME); {WITHOUT['rsam._C']}.", file=sys.stderr)
        return [], None
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        ext = CUDAExtension(
            "rsam._C",
            ["rsam/csrc/ext.cpp", "rsam/csrc/connected_components.cu"],
            extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-lineinfo"]},
        )
    except Exception as exc:  # torch missing in an isolated build env, broken toolkit, ...
        if not ALLOW_ERRORS:
            raise
        build_failed("rsam._C", exc)
        return [], None
    return [ext], BuildExtension.with_options(no_python_abi_suffix=True)


def tolerant(base):
    """``base`` (a build_ext command) where, with RSAM_BUILD_ALLOW_ERRORS=1, an extension that fails to build
    is a loud warning and is left out; the others are still built."""

    class TolerantBuild(base):
        def build_extensions(self):
            self.failed = []
            super().build_extensions()
            self.extensions = [ext for ext in self.extensions if ext.name not in self.failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not ALLOW_ERRORS:
                    raise
                build_failed(ext.name, exc)
                self.failed.append(ext.name)

    return TolerantBuild


ext_modules, cuda_build = cuda_extensions()

setup(
    name="rsam",
    version="0.1.0",
    description="RSAM: vision-language two-way guidance for referring remote sensing image segmentation",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rsam", "rsam.*", "training", "training.*"]),
    package_data={"rsam": ["csrc/*.cu", "csrc/*.cuh", "csrc/*.cpp"]},
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "rsam-train=training.train:main",
        "rsam-eval=training.eval:main",
        "rsam-predict=rsam.tools.predict:main",
        "rsam-data=rsam.tools.data:main",
        "rsam-export=rsam.tools.export:main",
        "rsam-ui=rsam.tools.ui:main",
        "rsam-compare=rsam.tools.compare:main",
    ]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": tolerant(cuda_build or build_ext)},
)
