"""The checks a stage runs before it loads anything: model paths, the stages that made them, tokenizers and
context lengths.

Each takes the stage's model specs by option name (`RLHFModule.model_specs`), so its message can name the option a
user sets.
"""

from __future__ import annotations

import os

from lightning.pytorch.utilities import rank_zero_warn

from dvpo_lightning.data.seeds import run_seed
from dvpo_lightning.data.sources import is_local
from dvpo_lightning.models import ModelSpec, check_tokenizer_matches, context_length, read_export_info
from dvpo_lightning.models.lineage import EXPORT_INFO

#: what each option takes, by its export's lineage record (`dvpo_export.json`): a policy option any stage's exported
#: policy (SFT, DPO, PPO, ...); a value option the exports of the stages named. Options not named here (the `model` an
#: RM or GVM stage starts from) take any model.
POLICY_OPTIONS = ("policy", "reference", "dpo_model")
VALUE_OPTION_STAGES = {
    "reward_model": ("RewardModelModule",),
    "critic": ("RewardModelModule", "GVMModule"),  # PPO's critic starts from a reward model or a GVM
    "value_model": ("GVMModule",),
}


def check_model_sources(stage: str, specs: dict[str, ModelSpec], tokenizer, exported_model: str) -> None:
    """Refuse a model path that does not exist, or a model saved with another tokenizer than `tokenizer`.

    `stage` names the module in the message; the option `model` of a one-model stage is its `exported_model`.
    """
    checked = set()
    for option, spec in specs.items():
        path = spec.name_or_path
        if path is None or path in checked:
            continue  # an inline architecture, or a model already checked under another option
        checked.add(path)
        if is_local(path) and not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(
                f"{stage} option `{option}`: name_or_path {path!r} does not exist; export that model first (run "
                "the stage that writes it) or correct the path"
            )
        role = (exported_model if option == "model" else option).replace("_", " ")
        check_tokenizer_matches(path, tokenizer, role, option=option)
    for option, spec in specs.items():
        if spec.name_or_path is not None:
            check_input_stage(stage, option, spec.name_or_path)


def check_input_stage(stage: str, option: str, path: str) -> None:
    """Refuse an export of a stage that option `option` does not take (a GVM as a reward model); warn that the
    stage of a value model without a lineage record naming it (a hub or foreign model) is unknown."""
    info = read_export_info(path) if is_local(path) else {}
    found = info.get("stage")  # None: no lineage record, or one that does not name its stage
    if option in POLICY_OPTIONS:
        wanted = "a policy export (of SFT, DPO, PPO, ...)"
        value_stages = {name for names in VALUE_OPTION_STAGES.values() for name in names}
        wrong = info.get("exported_model", "policy") != "policy" or found in value_stages
    elif option in VALUE_OPTION_STAGES:
        wanted = " or ".join(f"a {name} export" for name in VALUE_OPTION_STAGES[option])
        wrong = found is not None and found not in VALUE_OPTION_STAGES[option]
        if found is None:
            rank_zero_warn(
                f"{stage} option `{option}`: {path!r} has no {EXPORT_INFO} naming its stage (not a dvpo export), "
                f"so its stage is unknown; it is taken as {wanted}"
            )
    else:
        return
    if wrong:
        raise ValueError(
            f"{stage} option `{option}`: {path!r} is a {found} export (its {info.get('exported_model', 'model')}), but "
            f"`{option}` takes {wanted}: give the export of such a stage"
        )


def check_run_seeds_agree(stage: str, trainer) -> None:
    """Refuse a run whose processes have different run seeds: the models' initialisation and the data follow it
    by default (`data.seeds`), and FSDP2 does not broadcast initial weights. Lightning draws a seed at random on
    each process of a torchrun or srun launch when the config gives none."""
    if trainer is None or trainer.world_size == 1:
        return
    mine = run_seed()
    agree = trainer.strategy.reduce_boolean_decision(trainer.strategy.broadcast(mine) == mine, all=True)
    if not agree:
        raise ValueError(
            f"{stage}: the processes of this run have different seeds (Lightning drew one at random on each, as "
            "the config sets no seed_everything): pin --seed_everything, so that they build the same initial "
            "weights and read the same data split"
        )


def check_sequences_fit(stage: str, specs: dict[str, ModelSpec], datamodule) -> None:
    """Refuse training data whose prompt + response limits exceed a model's context.

    Past its context a model with learned positions fails with an index error deep inside its embedding (one with
    rotary positions silently reads positions it never saw). The contexts come from the models' configs, so this
    runs before any model or data is loaded.
    """
    longest = datamodule.max_prompt_length + datamodule.max_response_length
    for option, spec in specs.items():
        context = context_length(spec)
        if context is not None and longest > context:
            raise ValueError(
                f"{stage}: --data.init_args.max_prompt_length={datamodule.max_prompt_length} plus "
                f"--data.init_args.max_response_length={datamodule.max_response_length} allow {longest}-token "
                f"sequences, but the model `{option}` ({spec.describe()}) reads at most {context} (its "
                "max_position_embeddings): lower those limits or use a model with a longer context"
            )
