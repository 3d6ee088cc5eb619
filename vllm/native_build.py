"""Building the native ops (csrc/) with CMake: used by setup.py at install
time and by vllm.native on first use in a source checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = "_vllm_native.hash"  # the source hash the libraries next to it were built from


def source_hash() -> str | None:
    """A hash of csrc/ and CMakeLists.txt, or None without sources."""
    import glob
    import hashlib
    files = sorted(glob.glob(os.path.join(SOURCE_DIR, "csrc", "*")))
    if not files:
        return None
    h = hashlib.sha256()
    for path in files + [os.path.join(SOURCE_DIR, "CMakeLists.txt")]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def torch_has_cuda() -> bool:
    """Whether the torch that will run this package was built with CUDA (the
    build may run in an isolated environment without torch: ask the
    interpreter on PATH too)."""
    try:
        import torch
        return torch.version.cuda is not None
    except ImportError:
        pass
    python = shutil.which("python3") or shutil.which("python")
    if python is None:
        return False
    probe = subprocess.run([python, "-c", "import torch; print(torch.version.cuda or '')"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() != ""


def build_native(target_dir: str, build_dir: str, quiet: bool = True) -> list[str]:
    """Configure, build and install the libraries into ``target_dir``; returns
    their names. Raises OSError/CalledProcessError/RuntimeError on failure."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake not found")
    if not os.path.isfile(os.path.join(SOURCE_DIR, "CMakeLists.txt")):
        raise RuntimeError(f"no CMakeLists.txt in {SOURCE_DIR}")
    cuda = shutil.which("nvcc") is not None and torch_has_cuda()
    os.makedirs(build_dir, exist_ok=True)
    out = subprocess.DEVNULL if quiet else None
    configure = [cmake, "-S", SOURCE_DIR, "-B", build_dir, f"-DCMAKE_INSTALL_PREFIX={target_dir}",
                 f"-DVLLM_NATIVE_CUDA={'ON' if cuda else 'OFF'}"]
    if cuda:
        configure.append(f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}")
    subprocess.run(configure, check=True, stdout=out)
    subprocess.run([cmake, "--build", build_dir, "-j", str(os.cpu_count() or 2)], check=True,
                   stdout=out)
    subprocess.run([cmake, "--install", build_dir], check=True, stdout=out)
    with open(os.path.join(target_dir, STAMP), "w") as f:
        f.write(source_hash() or "")
    return ["_vllm_native_cpu"] + (["_vllm_native_cuda"] if cuda else [])


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(SOURCE_DIR, "vllm")
    print("built", build_native(target, os.path.join(SOURCE_DIR, "build", "native"), quiet=False))
