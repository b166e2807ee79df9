"""`make wheelhouse`: every wheel the project needs except torch, for a chosen Python and platform, in one folder.

    python scripts/wheelhouse.py --dest wheelhouse --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --extras dev,peft,notebook,bench --torch-version 2.13.0

An offline machine then installs from it with no index: `make install WHEELHOUSE=wheelhouse TORCH_SPEC=` uses
the torch already installed there (see the README, "Offline installs"). Torch is left out because GPU machines
bring their own CUDA build, and its wheels (GBs with the CUDA libraries) are what is not worth copying.

How: pip resolves the project's requirements for the target (`pip install --dry-run --report`, which reads
metadata only) with torch replaced by a stand-in wheel written here: the same version, requiring what the real
torch for that target requires minus its CUDA stack (nvidia-*, cuda-*, triton). So nothing of torch's CUDA stack
is resolved, while torch's small Python dependencies (sympy, networkx, jinja2, ...) are: a torch wheel put
beside the others installs offline too. `pip download --no-deps` then fetches exactly the resolved versions,
and the project's build requirements, which an editable install needs in its isolated build environment.

pip evaluates environment markers for the Python that runs it: run this with the target's Python version where
one is at hand (`make wheelhouse PYTHON=python3.12`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CUDA_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def this_platform() -> str:
    """This machine's manylinux tag, e.g. manylinux_2_36_x86_64."""
    libc, version = platform.libc_ver()
    if libc != "glibc":
        raise SystemExit(
            "wheelhouse: not a glibc Linux machine; pass --platform (e.g. manylinux_2_28_x86_64)"
        )
    return f"manylinux_{version.replace('.', '_')}_{platform.machine()}"


def compatible_platforms(tag: str) -> list[str]:
    """`tag` and every older manylinux tag a machine of that glibc also runs (pip takes each --platform as is)."""
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", tag)
    if match is None:
        return [tag]
    major, minor, arch = int(match[1]), int(match[2]), match[3]
    tags = [f"manylinux_{major}_{glibc}_{arch}" for glibc in range(minor, 16, -1)]
    if (major, minor) >= (2, 17):  # the legacy aliases of glibc 2.17, 2.12 and 2.5
        tags += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


def project_requirements(extras: list[str]) -> list[str]:
    """The project's dependencies with the chosen extras, and its build requirements, from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    optional = project["project"].get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"wheelhouse: unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    requirements = list(project["project"]["dependencies"])
    requirements += [requirement for extra in extras for requirement in optional[extra]]
    return requirements + list(project["build-system"]["requires"])


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def resolve(requirements: list[str], target: list[str], *options: str) -> list[dict]:
    """What pip would install for the target: the `install` entries of its report (metadata only)."""
    report = ("--dry-run", "--quiet", "--report", "-")
    with tempfile.TemporaryDirectory(prefix="wheelhouse-target-") as nowhere:  # pip < 23.? wants a --target
        done = pip("install", *report, "--target", nowhere, *target, *options, *requirements)
    if done.returncode != 0:
        raise SystemExit(f"wheelhouse: pip could not resolve {requirements}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)["install"]


def torch_python_requirements(version: str, target: list[str]) -> list[str]:
    """The real torch's requirements for the target without its CUDA stack; [] when pip cannot read them."""
    try:
        (torch,) = resolve([f"torch=={version}"], target, "--no-deps")
    except SystemExit as error:
        print(
            f"wheelhouse: torch {version}'s requirements unknown ({error}); a torch wheel will need its own"
        )
        return []
    return without_cuda_stack(torch["metadata"].get("requires_dist", []))


def without_cuda_stack(requirements: list[str]) -> list[str]:
    """`requirements` less torch's CUDA libraries (nvidia-*, cuda-*, triton), which come with any CUDA torch."""
    return [
        requirement
        for requirement in requirements
        if not CUDA_STACK.match(normalized(REQUIREMENT_NAME.match(requirement)[1]))
    ]


def stand_in_torch(directory: Path, version: str, requirements: list[str]) -> Path:
    """A metadata-only torch wheel: pip resolves against it without fetching torch or its CUDA libraries."""
    dist_info = f"torch-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\nName: torch\nVersion: "
        + version
        + "\n"
        + "".join(f"Requires-Dist: {requirement}\n" for requirement in requirements),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: wheelhouse\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},sha256={_digest(text)},{len(text.encode())}" for name, text in files.items()]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = directory / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def _digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/wheelhouse.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, required=True, help="the wheelhouse directory")
    parser.add_argument("--python-version", default="{}.{}".format(*sys.version_info[:2]), help="e.g. 3.12")
    parser.add_argument(
        "--platform", default=None, help="newest manylinux tag of the target (default: this one's)"
    )
    parser.add_argument("--extras", default="dev,peft,notebook,bench", help="the project's extras to include")
    parser.add_argument("--torch-version", required=True, help="the torch the target has (stand-in version)")
    args = parser.parse_args(argv)

    platforms = compatible_platforms(args.platform or this_platform())
    target = ["--only-binary=:all:", "--python-version", args.python_version, "--implementation", "cp"]
    target += [option for tag in platforms for option in ("--platform", tag)]
    extras = [extra for extra in args.extras.split(",") if extra]
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        stand_in = stand_in_torch(
            Path(tmp), args.torch_version, torch_python_requirements(args.torch_version, target)
        )
        resolved = resolve([f"torch @ {stand_in.as_uri()}", *project_requirements(extras)], target)
    pins = [
        f"{item['metadata']['name']}=={item['metadata']['version']}"
        for item in resolved
        if normalized(item["metadata"]["name"]) != "torch"
    ]
    args.dest.mkdir(parents=True, exist_ok=True)
    done = pip("download", "--no-deps", "--quiet", "--dest", str(args.dest), *target, *pins)
    if done.returncode != 0:
        raise SystemExit(f"wheelhouse: pip download failed:\n{done.stderr[-4000:]}")
    size = sum(path.stat().st_size for path in args.dest.glob("*.whl")) / 2**20
    print(
        f"wheelhouse: {len(pins)} wheels ({size:.0f} MiB in {args.dest}) for CPython {args.python_version} on "
        f"{platforms[0]} and older; torch {args.torch_version} and its CUDA libraries left out"
    )


if __name__ == "__main__":
    main()
