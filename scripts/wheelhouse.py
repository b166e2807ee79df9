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

`--image LIST` (`make gpu-wheels`) is for a machine whose Python already holds most of what is needed, such as the
GPU machine's fixed image (scripts/gpu_image.txt): the folder then holds only what that image lacks, with the
build requirements (an editable install builds in an isolated environment, which sees no installed package) and,
as a fallback, the resolved version of each image package that a carried one bounds from above (or whose known
version it rejects): pip installs the fallback into the new environment only where the image's version does not
fit. `--max-mib` fails when the folder is larger. `--refresh-image SOURCE` rewrites LIST from the image's
published package list (markdown naming `Packages: a, b, ...` and a `pip list` row of `name version` pairs) or
from `pip freeze` output taken there, and exits.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CUDA_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
IMAGE_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:==(\S+))?$")
UPPER_BOUNDS = ("<", "<=", "==", "~=", "===")


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


def build_requirements() -> list[str]:
    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"])


def project_requirements(extras: list[str]) -> list[str]:
    """The project's dependencies with the chosen extras, and its build requirements, from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    optional = project["project"].get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"wheelhouse: unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    requirements = list(project["project"]["dependencies"])
    requirements += [requirement for extra in extras for requirement in optional[extra]]
    return requirements + build_requirements()


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def read_image(path: Path) -> dict[str, str | None]:
    """The image's packages, normalised name -> version (None where unknown), from `name` or `name==version` lines."""
    packages = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = IMAGE_LINE.match(line)
        if match is None:
            raise SystemExit(f"wheelhouse: {path}:{number}: expected `name` or `name==version`, got {line!r}")
        packages[normalized(match[1])] = match[2]
    return packages


def parse_image_list(text: str) -> dict[str, str | None]:
    """Packages and known versions from `pip freeze` output or the image's markdown list (see the module doc)."""
    packages: dict[str, str | None] = {}
    names = re.search(r"Packages: ([^\n]*?)\.?\s*$", text, re.MULTILINE)
    for name in names[1].split(",") if names else []:
        packages[normalized(name.strip())] = None
    for line in text.splitlines():
        if "pip list" in line:
            for name, version in re.findall(r"([A-Za-z0-9][\w.-]*) (\d[\w.+!]*)(?=,|\s*\|)", line):
                if normalized(name) != "python":
                    packages[normalized(name)] = version
        elif match := re.fullmatch(r"([A-Za-z0-9][\w.-]*)==(\S+)", line.strip()):
            packages[normalized(match[1])] = match[2]
    if not packages:
        raise SystemExit("wheelhouse: no `Packages: ...` line, `pip list` row or `name==version` line found")
    return packages


def write_image(path: Path, packages: dict[str, str | None], source: str) -> None:
    header = (
        f"# The GPU machine's image: its Python's packages (`name==version` where known), read from {source}.\n"
        "# `make gpu-wheels` carries only what the project needs beyond these. Refresh from the image's published\n"
        "# list or a `pip freeze` taken there: python scripts/wheelhouse.py --image scripts/gpu_image.txt "
        "--refresh-image SOURCE\n"
    )
    lines = [name if version is None else f"{name}=={version}" for name, version in sorted(packages.items())]
    path.write_text(header + "\n".join(lines) + "\n")


def requirements_of(item: dict, python_version: str) -> list[Requirement]:
    """The requirements of a resolved `item` that apply on the target (its base and requested extras)."""
    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    extras = ["", *(item.get("requested_extras") or [])]
    applying = []
    for text in item["metadata"].get("requires_dist") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({**environment, "extra": extra}) for extra in extras):
            applying.append(requirement)
    return applying


def beyond_image(
    resolved: list[dict],
    image: dict[str, str | None],
    requirements: list[str],
    always: set[str],
    python_version: str,
) -> tuple[list[dict], list[str]]:
    """What to carry to the image, and notes: `requirements` (the project's) and, down from them, what they need.

    Walked from `requirements` through the carried items only: an image package stands for itself and its own
    needs (the image is installed and consistent). Carried: the resolved items the image lacks, those in
    `always`, and fallbacks: image packages a carried item (or the project) bounds from above where the version
    there is unknown, or whose known version it rejects. A lower bound on an unknown version is noted instead.
    """
    by_name = {normalized(item["metadata"]["name"]): item for item in resolved}
    carried: set[str] = set()
    notes = []
    pending = [{"metadata": {"name": "the project", "requires_dist": requirements}}]
    while pending:
        item = pending.pop()
        for requirement in requirements_of(item, python_version):
            name = normalized(requirement.name)
            if name in carried or name not in by_name:
                continue
            if name in image and name not in always:
                known, wanted = image[name], f"{name}{requirement.specifier} ({item['metadata']['name']})"
                if known is not None:
                    fits = requirement.specifier.contains(known, prereleases=True)
                else:
                    fits = not any(spec.operator in UPPER_BOUNDS for spec in requirement.specifier)
                if fits:
                    if known is None and str(requirement.specifier):
                        notes.append(f"assumed of the image: {wanted}")
                    continue
                version = by_name[name]["metadata"]["version"]
                notes.append(
                    f"fallback {name}=={version}: {wanted}, image has {known or 'an unknown version'}"
                )
            carried.add(name)
            pending.append(by_name[name])
    return [item for name, item in by_name.items() if name in carried], sorted(set(notes))


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
    parser.add_argument("--dest", type=Path, help="the wheelhouse directory (its old wheels are replaced)")
    parser.add_argument("--python-version", default="{}.{}".format(*sys.version_info[:2]), help="e.g. 3.12")
    parser.add_argument(
        "--platform", default=None, help="newest manylinux tag of the target (default: this one's)"
    )
    parser.add_argument("--extras", default="dev,peft,notebook,bench", help="the project's extras to include")
    parser.add_argument(
        "--torch-version", default=None, help="the torch the target has (default: the --image's)"
    )
    parser.add_argument("--image", type=Path, default=None, help="the target's packages: carry only the rest")
    parser.add_argument("--refresh-image", metavar="SOURCE", type=Path, help="rewrite --image from SOURCE")
    parser.add_argument("--max-mib", type=float, default=None, help="fail when the wheels are larger")
    args = parser.parse_args(argv)
    if args.refresh_image:
        if args.image is None:
            parser.error("--refresh-image needs --image, the list to write")
        packages = parse_image_list(args.refresh_image.read_text())
        write_image(args.image, packages, args.refresh_image.name)
        print(f"wheelhouse: {args.image}: {len(packages)} packages from {args.refresh_image}")
        return
    image = read_image(args.image) if args.image else {}
    torch_version = args.torch_version or image.get("torch")
    if args.dest is None or torch_version is None:
        parser.error("--dest is required, and --torch-version unless the --image names torch's version")
    if args.python_version != "{}.{}".format(*sys.version_info[:2]):
        print(
            f"wheelhouse: Python {sys.version.split()[0]} evaluates the markers for a {args.python_version} target"
        )

    platforms = compatible_platforms(args.platform or this_platform())
    target = ["--only-binary=:all:", "--python-version", args.python_version, "--implementation", "cp"]
    target += [option for tag in platforms for option in ("--platform", tag)]
    extras = [extra for extra in args.extras.split(",") if extra]
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        stand_in = stand_in_torch(Path(tmp), torch_version, torch_python_requirements(torch_version, target))
        # Known image versions cap the resolution, so the carried packages fit them (or the newest before them
        # that the index has).
        caps = Path(tmp) / "image-caps.txt"
        caps.write_text("".join(f"{n}<={v}\n" for n, v in image.items() if v is not None and n != "torch"))
        requirements = [f"torch @ {stand_in.as_uri()}", *project_requirements(extras)]
        resolved = resolve(requirements, target, *(("--constraint", str(caps)) if image else ()))
    resolved = [item for item in resolved if normalized(item["metadata"]["name"]) != "torch"]
    notes = []
    if image:
        always = {normalized(REQUIREMENT_NAME.match(r)[1]) for r in build_requirements()}
        needs = project_requirements(extras)
        resolved, notes = beyond_image(resolved, image, needs, always, args.python_version)
    pins = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in resolved]
    wheels = download(pins, target, args.dest)
    size = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    for note in notes:
        print(f"wheelhouse: {note}")
    if image:
        for wheel in wheels:
            print(f"wheelhouse:   {wheel.name} ({wheel.stat().st_size / 2**20:.2f} MiB)")
    left_out = f"what {args.image} has" if image else f"torch {torch_version} and its CUDA libraries"
    print(
        f"wheelhouse: {len(wheels)} wheels ({size:.1f} MiB in {args.dest}) for CPython {args.python_version} on "
        f"{platforms[0]} and older; {left_out} left out"
    )
    if args.max_mib is not None and size > args.max_mib:
        raise SystemExit(
            f"wheelhouse: {size:.1f} MiB is over --max-mib {args.max_mib:g}; the largest: "
            + ", ".join(w.name for w in sorted(wheels, key=lambda w: -w.stat().st_size)[:5])
        )


def download(pins: list[str], target: list[str], dest: Path) -> list[Path]:
    """The wheels of exactly `pins` in `dest`, replacing the wheels it held."""
    with tempfile.TemporaryDirectory(prefix="wheelhouse-download-") as fresh:
        done = pip("download", "--no-deps", "--quiet", "--dest", fresh, *target, *pins)
        if done.returncode != 0:
            raise SystemExit(f"wheelhouse: pip download failed:\n{done.stderr[-4000:]}")
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.whl"):
            old.unlink()
        for wheel in Path(fresh).glob("*.whl"):
            shutil.move(wheel, dest / wheel.name)
    return sorted(dest.glob("*.whl"))


if __name__ == "__main__":
    main()
