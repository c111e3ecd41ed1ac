"""Where tritonserver, its Python backend and the stub's Python come from: a stack.

Our pinned venv's nvidia-pytriton wheel (tritonserver 2.51), another venv's (the Merlin container's
stand-in, tritonserver 2.36), or a Triton container's own server ($TRITONSERVER). The backend
directory is assembled per start (library, utils and the stack's stub side by side, where the
backend looks for them), and the environment puts the stack's `bin` first on PATH, which is how
the stub finds its interpreter and packages.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from common.errors import ServerError


@dataclass(frozen=True)
class ServerStack:
    """Where tritonserver, its Python backend and the stub's interpreter come from.

    Attributes:
        python: the interpreter the Python-backend stub runs our model with; its environment
            holds nvidia-pytriton (unless `system_binary`) and the model's libraries.
        root: the tritonserver distribution inside that environment's nvidia-pytriton wheel.
        libs: the wheel's bundled shared libraries.
        libdir: the interpreter's LIBDIR (libpython for the stub).
        version: the interpreter's major.minor.
        system_binary: a tritonserver installed with its own backends (a Triton container's);
            then no backend directory is assembled.
    """

    python: Path
    root: Path | None
    libs: Path | None
    libdir: str
    version: str
    system_binary: Path | None = None

    @property
    def binary(self) -> Path:
        return self.system_binary or self.root / "bin" / "tritonserver"

    @classmethod
    def current(cls) -> "ServerStack":
        """This interpreter's stack; $TRITONSERVER names a system tritonserver (inside a Triton
        container) whose own backends are used."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        if os.environ.get("TRITONSERVER"):
            return cls(Path(sys.executable), None, None, libdir, version, system_binary=Path(os.environ["TRITONSERVER"]))
        try:
            import pytriton
        except ImportError:
            raise ServerError("nvidia-pytriton is not installed and $TRITONSERVER is not set; no tritonserver to run") from None
        root = Path(pytriton.__file__).parent / "tritonserver"
        return cls(Path(sys.executable), root, root.parent.parent / "nvidia_pytriton.libs", libdir, version)

    @classmethod
    def of_python(cls, python: str | Path) -> "ServerStack":
        """The stack of another interpreter (another virtualenv), asked from that interpreter."""
        code = ("import json, sys, sysconfig, pathlib, pytriton; r = pathlib.Path(pytriton.__file__).parent; "
                "print(json.dumps([str(r / 'tritonserver'), str(r.parent / 'nvidia_pytriton.libs'), "
                "sysconfig.get_config_var('LIBDIR') or '', '%d.%d' % sys.version_info[:2]]))")
        try:
            out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise ServerError(f"cannot ask {python} where its tritonserver is: {e}") from None
        root, libs, libdir, version = json.loads(out.strip().splitlines()[-1])
        return cls(Path(python), Path(root), Path(libs), libdir, version)


@functools.lru_cache(maxsize=8)
def tritonserver_flags(stack: ServerStack) -> frozenset[str]:
    """The command-line flags the stack's tritonserver knows (read from its --help)."""
    try:
        out = subprocess.run([str(stack.binary), "--help"], capture_output=True, text=True, timeout=60,
                             env=server_environment(stack))
    except (OSError, subprocess.SubprocessError) as e:
        raise ServerError(f"cannot run {stack.binary} --help: {e}") from None
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", out.stdout + out.stderr))


def prepare_backends(dest: Path, stack: ServerStack | None = None) -> Path:
    """Lays out `dest/python/` with the Python backend and the stack's stub."""
    stack = stack or ServerStack.current()
    stub = stack.root / "python_backend_stubs" / stack.version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel under {stack.root} has no Python backend stub for Python {stack.version}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(stack.root / "backends" / "python" / name, python_dir / name)
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    return dest


def server_environment(stack: ServerStack | None = None) -> dict[str, str]:
    """Environment for tritonserver: the wheel's libraries and the stack's interpreter first on PATH."""
    stack = stack or ServerStack.current()
    env = dict(os.environ)
    if stack.system_binary is None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(stack.libs), stack.libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(stack.python.parent), env.get("PATH", "")))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env
