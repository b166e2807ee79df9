"""The checks a stage runs before it loads anything: model paths, tokenizers and context lengths.

Each takes the stage's model specs by option name (`RLHFModule.model_specs`), so its message can name the option a
user sets.
"""

from __future__ import annotations

import os

from dvpo_lightning.data.sources import is_local
from dvpo_lightning.models import ModelSpec, check_tokenizer_matches, context_length


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
