"""Build the one C extension, agentmount.fuse._lowlevel (see its header). Metadata: pyproject.toml.

Compiler and linker flags come from `pkg-config fuse3` (scripts/ensure-deps.sh installs gcc,
pkg-config and libfuse3-dev).
"""
import shlex
import subprocess

from setuptools import Extension, setup


def pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args, "fuse3"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"agentmount needs libfuse3's headers to build: `pkg-config {' '.join(args)} fuse3` "
                         f"failed ({e}); run scripts/ensure-deps.sh (Debian: apt-get install libfuse3-dev "
                         "pkg-config gcc)") from None
    return shlex.split(out)


setup(ext_modules=[Extension(
    "agentmount.fuse._lowlevel",
    sources=["agentmount/fuse/_lowlevel.c"],
    extra_compile_args=pkg_config("--cflags") + ["-Wall", "-Wextra", "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers"],
    extra_link_args=pkg_config("--libs"),
)])
