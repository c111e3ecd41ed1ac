"""docker/Dockerfile.gpu and requirements-gpu.txt agree with the CPU image (no Docker engine here).

The GPU image is the CPU image's pinned stack with one swap, faiss-cpu -> faiss-gpu-cu12 of the same
FAISS version; these tests read the files and fail when the two drift apart.
"""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from common import contract

ROOT = Path(__file__).resolve().parents[2]
GPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"
CPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.cpu"
VENV_SITE = "/opt/venv/lib/python3.11/site-packages"
# The CUDA that faiss-gpu-cu12's [fix_cuda] extra pins its runtime and cuBLAS wheels to (from the wheel's metadata).
FIX_CUDA = {"1.8.0.2": "12.1"}
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[(?P<extras>[^\]]*)\])?==(?P<version>\S+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    assert not pending, f"{path.name} ends in a continuation line"
    return out


def _args(instructions, word: str) -> list[str]:
    return [args for w, args in instructions if w == word]


def _env(instructions) -> dict[str, str]:
    env = {}
    for args in _args(instructions, "ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"ENV {args!r}: use the key=value form"
            env[key] = value
    return env


def _pins(path: Path) -> list[tuple[str, frozenset, str]]:
    """(normalized name, extras, version) of each line of a requirements file, in order; every line must be ==."""
    pins = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = REQUIREMENT.match(line)
        assert match, f"{path.name}: {line!r} is not an exact `name==version` pin"
        extras = frozenset(e.strip() for e in (match["extras"] or "").split(",") if e.strip())
        pins.append((_norm(match["name"]), extras, match["version"]))
    return pins


def _release(version: str) -> tuple[int, ...]:
    """FAISS's major.minor.patch: 1.8.0.post1 (faiss-cpu) and 1.8.0.2 (faiss-gpu-cu12's 2nd wheel build) are 1.8.0."""
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", version)
    assert match, version
    return tuple(int(x) for x in match.groups())


@pytest.fixture(scope="module")
def gpu():
    return _instructions(GPU_DOCKERFILE)


@pytest.fixture(scope="module")
def cpu():
    return _instructions(CPU_DOCKERFILE)


@pytest.fixture(scope="module")
def run(gpu):
    return " && ".join(_args(gpu, "RUN"))


def test_base_is_a_cuda_12_runtime_image(gpu):
    froms = _args(gpu, "FROM")
    assert len(froms) == 1, froms
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)(?:-cudnn\d+)?-runtime-ubuntu(\d+\.\d+)", froms[0])
    assert match, f"not an nvidia/cuda runtime image: {froms[0]}"
    assert match[1] == "12", f"CUDA {match[1]}, not 12 (faiss-gpu-cu12 and tritonserver's libcudart are CUDA 12)"
    assert match[4] == "22.04"  # glibc 2.35: nvidia-pytriton 0.7.0 is a manylinux_2_35 wheel


def test_python_3_11_is_installed_and_the_one_used(gpu, run):
    assert re.search(r"apt-get install [^&]*\bpython3\.11\b", run) and "python3.11-venv" in run
    assert "libpython3.11" in run  # the Python-backend stub links libpython3.11.so.1.0
    venv = re.search(r"python3\.11 -m venv (\S+)", run)
    assert venv, "no python3.11 venv"
    path = _env(gpu)["PATH"].split(":")
    assert path[0] == f"{venv[1]}/bin", "the venv is not first on PATH (the stub finds python3 there)"
    assert VENV_SITE.startswith(venv[1] + "/")
    # every later `python` is the venv's (pip, pip check); nothing runs the Ubuntu python3 (3.10)
    assert not re.search(r"\bpython3(?:\.10)?\s+-m\s+pip\b", run)
    assert re.search(r"sys\.version_info\[:2\] == \(3, 11\)", run)


def test_pip_and_the_install_line_match_the_cpu_image(cpu, run):
    cpu_run = " && ".join(_args(cpu, "RUN"))
    (cpu_pip,) = set(re.findall(r"\bpip==(\S+)", cpu_run))
    assert set(re.findall(r"\bpip==(\S+)", run)) == {cpu_pip} == {"23.2.1"}
    assert "python -m pip install --no-cache-dir -r requirements-gpu.txt -c constraints.txt" in run
    assert "python -m pip check" in run
    assert "-r requirements.txt" not in run


def test_the_requirement_files_are_copied_before_the_install(gpu):
    copies = _args(gpu, "COPY")
    first = next(i for i, (w, a) in enumerate(gpu) if w == "RUN" and "requirements-gpu.txt" in a)
    copied = [i for i, (w, a) in enumerate(gpu) if w == "COPY" and "requirements-gpu.txt" in a.split() and "constraints.txt" in a.split()]
    assert copied and copied[0] < first, copies


def test_every_pin_is_the_cpu_images_except_faiss():
    cpu_pins, gpu_pins = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-gpu.txt")
    assert len(cpu_pins) == len(gpu_pins), "requirements-gpu.txt has other lines than requirements.txt"
    swapped = []
    for c, g in zip(cpu_pins, gpu_pins):
        if c[0] == "faiss-cpu":
            swapped.append((c, g))
        else:
            assert g == c, f"requirements-gpu.txt has {g}, requirements.txt {c}"
    assert len(swapped) == 1, "requirements.txt pins faiss-cpu once"
    (faiss_cpu, faiss_gpu), = swapped
    assert faiss_gpu[0] == "faiss-gpu-cu12", f"faiss-cpu became {faiss_gpu[0]}, not the CUDA 12 build"
    assert _release(faiss_gpu[2]) == _release(faiss_cpu[2]), (
        f"FAISS {faiss_gpu[2]} on GPU, {faiss_cpu[2]} on CPU: not the same FAISS release")
    assert "faiss-cpu" not in {name for name, _, _ in gpu_pins}  # both would install the `faiss` module


def test_constraints_do_not_contradict_the_gpu_pins():
    constraints = {name: version for name, _, version in _pins(ROOT / "constraints.txt")}
    for name, _, version in _pins(ROOT / "requirements-gpu.txt"):
        if name in constraints:
            assert constraints[name] == version, f"constraints.txt pins {name}=={constraints[name]}, requirements-gpu.txt {version}"


def test_faiss_cuda_libraries_are_the_base_images_cuda(gpu):
    (_, extras, version), = [p for p in _pins(ROOT / "requirements-gpu.txt") if p[0] == "faiss-gpu-cu12"]
    base = re.search(r"nvidia/cuda:(\d+\.\d+)\.", _args(gpu, "FROM")[0])[1]
    if "fix_cuda" in extras:
        assert version in FIX_CUDA, f"look up the CUDA that faiss-gpu-cu12 {version}[fix_cuda] pins and add it to FIX_CUDA"
        assert FIX_CUDA[version] == base, f"faiss-gpu-cu12[fix_cuda] loads CUDA {FIX_CUDA[version]}, the base image is CUDA {base}"


def _tf_cuda_wheels(run: str) -> dict[str, str]:
    return {_norm(m[0]): m[1] for m in re.findall(r"\b(nvidia-[a-z_-]+-cu11)==(\S+)", run)}


def test_tensorflow_gets_the_cuda_it_was_built_for(gpu, run):
    """TensorFlow 2.12 from PyPI loads CUDA 11.8 / cuDNN 8 libraries by soname: the image installs those
    wheels and puts their lib folders on LD_LIBRARY_PATH."""
    wheels = _tf_cuda_wheels(run)
    assert {"nvidia-cuda-runtime-cu11", "nvidia-cublas-cu11", "nvidia-cudnn-cu11"} <= set(wheels), wheels
    assert wheels["nvidia-cuda-runtime-cu11"].startswith("11.8.")
    assert wheels["nvidia-cudnn-cu11"].split(".")[0] == "8"
    tf = next(v for n, _, v in _pins(ROOT / "requirements-gpu.txt") if n == "tensorflow")
    assert _release(tf)[:2] == (2, 12), f"tensorflow {tf}: check the CUDA/cuDNN its wheel is built for and update the cu11 wheels"
    library_path = _env(gpu)["LD_LIBRARY_PATH"].split(":")
    for name in wheels:
        folder = "cuda_runtime" if name == "nvidia-cuda-runtime-cu11" else name[len("nvidia-"):-len("-cu11")]
        assert f"{VENV_SITE}/nvidia/{folder}/lib" in library_path, name
    assert library_path[-1] == "${LD_LIBRARY_PATH}"  # the base image's driver paths stay


def test_the_installed_tensorflow_is_built_for_that_cuda(run):
    """Cross-check against the TensorFlow this venv installed from the same pin (its build_info, not imported)."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorflow is not installed here")
    text = (Path(spec.submodule_search_locations[0]) / "python" / "platform" / "build_info.py").read_text()
    cuda = re.search(r"\('cuda_version', '([\d.]+)'\)", text)[1]
    cudnn = re.search(r"\('cudnn_version', '(\d+)'\)", text)[1]
    wheels = _tf_cuda_wheels(run)
    assert wheels["nvidia-cuda-runtime-cu11"].startswith(cuda + "."), (cuda, wheels)
    assert wheels["nvidia-cudnn-cu11"].split(".")[0] == cudnn, (cudnn, wheels)


def test_environment_and_ports(gpu):
    env = _env(gpu)
    assert env["PYTHONPATH"] == "/app" and env["PYTHONUNBUFFERED"] == "1"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    exposed = {int(p) for args in _args(gpu, "EXPOSE") for p in args.split()}
    assert exposed == {contract.DEFAULT_HTTP_PORT, contract.DEFAULT_GRPC_PORT, contract.DEFAULT_METRICS_PORT,
                       contract.DEFAULT_HEALTH_PORT}


def test_cmd_is_the_cpu_images(gpu, cpu):
    (gpu_cmd,), (cpu_cmd,) = _args(gpu, "CMD"), _args(cpu, "CMD")
    assert json.loads(gpu_cmd) == json.loads(cpu_cmd)
    assert json.loads(gpu_cmd)[:4] == ["python", "-m", "ensemble", "serve"]


def test_copies_the_same_packages_as_the_cpu_image(gpu, cpu):
    def packages(instructions):
        return [a for a in _args(instructions, "COPY") if re.fullmatch(r"(\w+) \./\1", a)]

    assert packages(gpu) == packages(cpu)
    for package in ("common", "ensemble"):
        assert f"{package} ./{package}" in packages(gpu)
        assert (ROOT / package).is_dir()
    assert _args(gpu, "WORKDIR") == _args(cpu, "WORKDIR") == ["/app"]
