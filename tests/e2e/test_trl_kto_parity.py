"""KTO against TRL's: the first-step loss of our `KTOModule` equals that of TRL's `KTOTrainer` on an identical
batch (the same tiny policy and reference as `benchmarks.peer` builds them, the same labelled responses as the same
token ids, in the same order, so that both pair each prompt with the same mismatched response for the KL
estimate). Skipped where TRL is not installed (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import peer
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import ModelSpec
from dvpo_lightning.modules import KTOModule

pytest.importorskip("trl")

pytestmark = pytest.mark.filterwarnings("ignore")

BATCH = 8
OPTIONS = dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return peer.prepare_job(peer.QUICK, tmp_path_factory.mktemp("peer"))


@pytest.fixture(scope="module")
def unpaired(job, tmp_path_factory):
    """`job`'s pairs as `kto` rows, each pair's chosen response desirable and its rejected one not."""
    return [
        {"prompt": pair["prompt"], "completion": pair[key], "label": key == "chosen"}
        for pair in job.pairs
        for key in ("chosen", "rejected")
    ]


@pytest.fixture(scope="module")
def data(job, unpaired, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kto")
    path = tmp / "kto.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in unpaired))
    data = RLHFDataModule(
        str(path),
        tokenizer=job.policy_dir,
        batch_size=BATCH,
        mode="unpaired",
        val_size=0,
        max_prompt_length=peer.MAX_LENGTH,
        max_response_length=peer.MAX_LENGTH,
        cache_dir=str(tmp / "cache"),
    )
    data.setup("fit")
    return data


def trl_first_loss(
    job, unpaired: list[dict], order: list[int], tmp_path, policy: str, reference: str
) -> tuple:
    """TRL's `KTOTrainer` loss and KL estimate on the rows `order` of `unpaired`, one batch, in that order."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    rows = [{**unpaired[i], "completion": job.completion_prefix + unpaired[i]["completion"]} for i in order]
    args = KTOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(order),
        max_length=None,
        train_sampling_strategy="sequential",
        bf16=False,  # TRL's default on a CPU with bfloat16 runs its reference model under autocast
        fp16=False,
        use_cpu=True,
        report_to="none",
        **OPTIONS,
    )
    trainer = KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(job.policy_dir),
    )
    trl_batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, trl_batch))
    return loss, trainer._metrics["train"]["kl"][-1], trainer.train_dataset


# `job`'s two random models in one order give a positive KL estimate (the reference point is exercised), in the
# other a negative one (clamped to 0)
@pytest.mark.parametrize("swap", [True, False], ids=["kl-positive", "kl-clamped"])
def test_first_step_loss_equals_trls_kto_trainer(swap, job, unpaired, data, tmp_path):
    policy, reference = (job.reference_dir, job.policy_dir) if swap else (job.policy_dir, job.reference_dir)
    batch = next(iter(data.train_dataloader()))
    order = [int(index) for index in batch["index"]]
    assert 0 < int(batch["label"].sum()) < BATCH, "the batch has desirable and undesirable responses"
    trl_loss, trl_kl, trl_rows = trl_first_loss(job, unpaired, order, tmp_path, policy, reference)
    ours = {row["row"]: row for row in data.train_dataset}
    for index, theirs in zip(order, trl_rows):
        assert list(ours[index]["prompt_ids"]) == list(theirs["prompt_ids"])
        assert list(ours[index]["response_ids"]) == list(theirs["completion_ids"])
    module = KTOModule(
        policy=ModelSpec(name_or_path=policy),
        reference=ModelSpec(name_or_path=reference),
        tokenizer=data.tokenizer,
        **OPTIONS,
    )
    module.configure_model()
    with torch.no_grad():
        loss = float(module.training_step(batch, 0))
    assert (trl_kl > 0) == swap
    assert loss == pytest.approx(trl_loss, rel=2e-6, abs=1e-6)  # float32 sums in another order
