"""`make wheelhouse`: the pieces that decide what goes in it (the download itself needs a network: see the README)."""

from __future__ import annotations

import zipfile

import pytest

from scripts import wheelhouse
from scripts.wheelhouse import (
    beyond_image,
    compatible_platforms,
    parse_image_list,
    project_requirements,
    read_image,
    stand_in_torch,
    without_cuda_stack,
    write_image,
)


def test_a_glibc_tag_brings_every_older_manylinux_tag():
    tags = compatible_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[10] == "manylinux_2_18_x86_64"
    assert tags[11:] == [
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
    ]
    assert compatible_platforms("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_torchs_cuda_stack_is_left_out_and_its_python_dependencies_kept():
    requires = [
        "filelock",
        "sympy>=1.13.3",
        "nvidia-cudnn-cu13==9.20.0.48; platform_system == 'Linux'",
        "cuda-toolkit[cublas,cudart]==13.0.3; platform_system == 'Linux'",
        "cuda_bindings<14",
        "triton==3.7.1; platform_system == 'Linux'",
        "optree>=0.13.0; extra == 'optree'",
    ]
    assert without_cuda_stack(requires) == ["filelock", "sympy>=1.13.3", "optree>=0.13.0; extra == 'optree'"]


def test_the_stand_in_torch_is_a_wheel_declaring_the_kept_requirements(tmp_path):
    wheel = stand_in_torch(tmp_path, "2.13.0", ["sympy>=1.13.3", "jinja2"])
    assert wheel.name == "torch-2.13.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("torch-2.13.0.dist-info/METADATA").decode()
        record = archive.read("torch-2.13.0.dist-info/RECORD").decode()
    assert "Name: torch\nVersion: 2.13.0\n" in metadata
    assert "Requires-Dist: sympy>=1.13.3\nRequires-Dist: jinja2\n" in metadata
    assert "torch-2.13.0.dist-info/METADATA,sha256=" in record


def test_the_requirements_are_the_projects_own_with_its_build_requirements():
    requirements = project_requirements(["peft"])
    assert "lightning>=2.5" in requirements and "peft>=0.13" in requirements
    assert "setuptools>=77" in requirements  # an editable install builds offline too
    assert not any(requirement.startswith("trl") for requirement in requirements)  # only the extras asked for


def _resolved(name: str, version: str, requires: list[str], extras: list[str] | None = None) -> dict:
    """One `install` entry of pip's report, as `resolve` returns it."""
    return {
        "metadata": {"name": name, "version": version, "requires_dist": requires},
        "requested_extras": extras,
    }


def test_the_image_list_reads_the_published_markdown_and_pip_freeze():
    published = (
        "| pip list, as a session saw it | 2026-11: python3 is Python 3.12.3. accelerate 1.15.0, "
        "huggingface_hub 1.33.0, torch 2.11.0 |\n\n## Python packages already there\n\n"
        "Packages: accelerate, Huggingface_Hub, pyarrow, torch.\n"
    )
    assert parse_image_list(published) == {
        "accelerate": "1.15.0",
        "huggingface-hub": "1.33.0",
        "pyarrow": None,
        "torch": "2.11.0",
    }
    assert parse_image_list("torch==2.11.0+cu130\nPyYAML==6.0.3\n") == {
        "torch": "2.11.0+cu130",
        "pyyaml": "6.0.3",
    }
    with pytest.raises(SystemExit, match="no `Packages: ...` line"):
        parse_image_list("nothing here")


def test_the_image_list_round_trips_and_names_a_bad_line(tmp_path):
    listing = tmp_path / "image.txt"
    write_image(listing, {"torch": "2.11.0", "pyarrow": None}, "KINDS.md")
    assert read_image(listing) == {"pyarrow": None, "torch": "2.11.0"}
    listing.write_text("torch>=2\n")
    with pytest.raises(SystemExit, match="image.txt:1: expected `name` or `name==version`"):
        read_image(listing)


def test_only_what_the_image_lacks_is_carried_with_fallbacks_for_what_may_not_fit():
    resolved = [
        _resolved(
            "datasets", "5.2.0", ["fsspec<=2026.9.0,>=2023.1.0", "pyarrow>=24", "huggingface-hub<3,>=1.31"]
        ),
        _resolved(
            "jsonargparse",
            "4.53.0",
            ["PyYAML>=3.13", 'docstring-parser>=0.17; extra == "signatures"'],
            ["signatures"],
        ),
        _resolved("docstring_parser", "0.18.0", ["pytest; extra == 'test'"]),
        _resolved("fsspec", "2026.9.0", []),
        _resolved("pyarrow", "26.0.1", []),
        _resolved("PyYAML", "6.0.3", []),
        _resolved("huggingface_hub", "1.33.0", []),
        _resolved("pytest", "9.0.0", []),  # only an extra not asked for wants it
        _resolved("setuptools", "81.0.0", []),
        _resolved("peft", "0.21.0", ["safetensors>=0.9"]),
        _resolved("typer", "0.29.2", ["pydantic>=2.5"]),  # the image's own typer may not want pydantic
        _resolved("pydantic", "2.14.4", []),
    ]
    project = ["datasets>=3", "jsonargparse[signatures]>=4.35", "peft>=0.13", "setuptools>=77"]
    image = {
        "fsspec": None,
        "pyarrow": None,
        "pyyaml": None,
        "huggingface-hub": "1.33.0",
        "pytest": None,
        "setuptools": "69.0.0",
        "peft": None,
        "safetensors": "0.8.0",
    }
    carried, notes = beyond_image(resolved, image, project, {"setuptools"}, "3.12")
    names = [item["metadata"]["name"] for item in carried]
    # fsspec: bounded from above and unknown there; setuptools: a build requirement, which no installed copy serves;
    # pydantic: only an image package (typer) names it.
    assert names == ["datasets", "jsonargparse", "docstring_parser", "fsspec", "setuptools"]
    assert (
        "fallback fsspec==2026.9.0: fsspec<=2026.9.0,>=2023.1.0 (datasets), image has an unknown version"
        in notes
    )
    assert "assumed of the image: pyarrow>=24 (datasets)" in notes
    assert not any(
        "huggingface" in note or "safetensors" in note for note in notes
    )  # 1.33.0 fits; peft is the image's
    image["huggingface-hub"] = "1.20.0"  # a known version a carried package rejects is carried too
    carried, notes = beyond_image(resolved, image, project, {"setuptools"}, "3.12")
    assert "huggingface_hub" in [item["metadata"]["name"] for item in carried]


def test_gpu_wheels_lists_what_it_carries_and_fails_over_the_size_limit(tmp_path, monkeypatch, capsys):
    """`make gpu-wheels` offline: pip's resolution and download replaced, the rest (the image walk, the size check) real."""
    image = tmp_path / "image.txt"
    write_image(image, {"torch": "2.11.0", "lightning": None, "pyyaml": None}, "test")
    resolved = [
        _resolved("lightning", "2.6.6", []),
        _resolved("jsonargparse", "4.53.0", ["PyYAML>=3.13"]),
        _resolved("PyYAML", "6.0.3", []),
        _resolved("setuptools", "81.0.0", []),
    ]
    monkeypatch.setattr(wheelhouse, "torch_python_requirements", lambda version, target: [])
    monkeypatch.setattr(wheelhouse, "resolve", lambda requirements, target, *options: resolved)
    megabytes = {"jsonargparse": 1, "setuptools": 2}

    def download(pins, target, dest):
        dest.mkdir(exist_ok=True)
        for pin in pins:
            name, version = pin.split("==")
            (dest / f"{name}-{version}-py3-none-any.whl").write_bytes(b"0" * megabytes[name] * 2**20)
        return sorted(dest.glob("*.whl"))

    monkeypatch.setattr(wheelhouse, "download", download)
    options = ["--dest", str(tmp_path / "wheels"), "--image", str(image), "--extras", "peft"]
    wheelhouse.main([*options, "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64"])
    out = capsys.readouterr().out
    assert "jsonargparse-4.53.0-py3-none-any.whl (1.00 MiB)" in out and "setuptools-81.0.0" in out
    assert "wheelhouse: 2 wheels (3.0 MiB in" in out and "lightning-2.6.6" not in out  # the image has it
    with pytest.raises(SystemExit, match="3.0 MiB is over --max-mib 2; the largest: setuptools-81.0.0"):
        wheelhouse.main(
            [*options, "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--max-mib", "2"]
        )
