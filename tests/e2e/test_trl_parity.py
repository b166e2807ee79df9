"""Every preference loss against TRL's: the first-step loss of our `DPOModule` equals that of TRL's trainer on an
identical batch (the same tiny policy and reference, the same pairs as the same token ids: `benchmarks.peer`
builds both sides). Skipped where TRL is not installed (`pip install -e '.[bench]'`).

TRL's `DPOTrainer` has every loss but SimPO, which its experimental `CPOTrainer` has, and ORPO, in its
experimental `ORPOTrainer`, whose NLL term also counts the prompt's tokens (the paper's counts the response's
only, as ours does): there the odds-ratio terms are compared.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import peer
from dvpo_lightning.algos import PREFERENCE_LOSSES, PreferenceObjective
from dvpo_lightning.models import ModelSpec
from dvpo_lightning.modules import DPOModule

pytest.importorskip("trl")

pytestmark = pytest.mark.filterwarnings("ignore")

TOLERANCE = dict(rel=2e-6, abs=1e-6)  # float32 sums in another order; sppo_hard's loss is ~50

# case -> (our DPOModule options, TRL's DPOConfig options); beta is peer.BETA on both sides.
DPO_CASES = {
    **{
        name: ({"loss_type": name}, {"loss_type": [name]})
        for name in (
            "sigmoid",
            "sigmoid_norm",
            "hinge",
            "nca_pair",
            "bco_pair",
            "sppo_hard",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "discopop",
        )
    },
    # TRL's IPO divides each log-ratio by its response length; ours sums them unless told so
    "ipo": (
        {"loss_type": "ipo", "ipo_normalization": "token_mean"},
        {"loss_type": ["ipo"]},
    ),
    "robust": (
        {"loss_type": "robust", "label_smoothing": 0.2},
        {"loss_type": ["robust"], "label_smoothing": 0.2},
    ),
    "exo_pair": (
        {"loss_type": "exo_pair", "label_smoothing": 0.01},
        {"loss_type": ["exo_pair"], "label_smoothing": 0.01},
    ),
    "aot": ({"loss_type": "aot", "label_smoothing": 0.1}, {"loss_type": ["aot"], "label_smoothing": 0.1}),
    "nll": ({"loss_type": "nll"}, {"loss_type": ["sft"]}),
    "rpo": (
        {"loss_type": ["sigmoid", "nll"], "loss_weights": [1.0, 0.5]},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    ),
    "mpo": (
        {"loss_type": ["sigmoid", "bco_pair", "nll"], "loss_weights": [0.8, 0.2, 1.0]},
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    ),
}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return peer.prepare_job(peer.QUICK, tmp_path_factory.mktemp("peer"))


@pytest.fixture(scope="module")
def batch(job):
    """Our loader's first batch; TRL is fed the same pairs in the same order."""
    return next(iter(job.data.train_dataloader()))


def our_first_loss(job: peer.Job, batch: dict, **options) -> float:
    """The loss our `DPOModule` optimises at its first step, the reference being `job`'s when the loss reads one."""
    loss_type = options["loss_type"]
    reference = {}
    if PreferenceObjective(loss_type).needs_reference:
        reference = {"reference": ModelSpec(name_or_path=job.reference_dir)}
    module = DPOModule(
        policy=ModelSpec(name_or_path=job.policy_dir), tokenizer=job.data.tokenizer, **reference, **options
    )
    module.configure_model()
    with torch.no_grad():
        return float(module.training_step(batch, 0))


def test_every_registered_loss_is_compared_with_trl():
    compared = {
        name
        for ours, _ in DPO_CASES.values()
        for name in ([ours["loss_type"]] if isinstance(ours["loss_type"], str) else ours["loss_type"])
    }
    assert compared | {"simpo", "orpo"} == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("case", sorted(DPO_CASES))
def test_first_step_loss_equals_trls_dpo_trainer(case, job, batch, tmp_path):
    ours, theirs = DPO_CASES[case]
    order = [int(index) for index in batch["index"]]
    trainer = peer.trl_trainer(
        job, order, peer.QUICK, torch.device("cpu"), tmp_path, beta=peer.BETA, **theirs
    )
    trl_batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, trl_batch))
    assert our_first_loss(job, batch, beta=peer.BETA, **ours) == pytest.approx(trl_loss, **TOLERANCE)


def reference_free_trainer(trainer_class, config_class, job: peer.Job, batch: dict, tmp_path, **options):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = config_class(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(batch["index"]),
        max_length=512,
        use_cpu=True,
        report_to="none",
        **options,
    )
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(job.policy_dir, dtype=torch.float32),
        args=args,
        train_dataset=peer.trl_rows(job, [int(index) for index in batch["index"]]),
        processing_class=AutoTokenizer.from_pretrained(job.policy_dir),
    )
    trl_batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return trainer.get_batch_loss_metrics(trainer.model, trl_batch)


def test_simpo_first_step_loss_equals_trls_cpo_trainer(job, batch, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    # cpo_alpha = 0: SimPO alone, without CPO's NLL term
    options = dict(beta=2.0, simpo_gamma=1.0, label_smoothing=0.1)
    loss, _ = reference_free_trainer(
        CPOTrainer, CPOConfig, job, batch, tmp_path, loss_type="simpo", cpo_alpha=0.0, **options
    )
    assert our_first_loss(job, batch, loss_type="simpo", **options) == pytest.approx(float(loss), **TOLERANCE)


def test_orpo_odds_ratio_term_equals_trls_orpo_trainer(job, batch, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    loss, metrics = reference_free_trainer(ORPOTrainer, ORPOConfig, job, batch, tmp_path, beta=0.5)
    trl_odds_ratio_term = float(loss) - float(metrics["nll_loss"])
    ours = our_first_loss(job, batch, loss_type="orpo", beta=0.5) - our_first_loss(
        job, batch, loss_type="nll"
    )
    assert ours == pytest.approx(trl_odds_ratio_term, **TOLERANCE)
    assert abs(trl_odds_ratio_term) > 0.01  # a real term, not two zeros
