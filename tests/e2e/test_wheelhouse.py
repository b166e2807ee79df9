"""`make wheelhouse`: the pieces that decide what goes in it (the download itself needs a network: see the README)."""

from __future__ import annotations

import zipfile

from scripts.wheelhouse import compatible_platforms, project_requirements, stand_in_torch, without_cuda_stack


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
    assert "setuptools>=68" in requirements  # an editable install builds offline too
    assert not any(requirement.startswith("trl") for requirement in requirements)  # only the extras asked for
