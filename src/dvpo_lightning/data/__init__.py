"""Data: sources, formats, bad rows, tokenizers, tokenisation and split-layout collation.

`RLHFDataModule` is the one data module of every stage; `get_task` gives the built-in offline tasks;
`concat_prompt_response` and `position_ids_from_mask` are the split-layout helpers models use.
"""

from dvpo_lightning.data.builtin import get_task
from dvpo_lightning.data.collate import concat_prompt_response, position_ids_from_mask
from dvpo_lightning.data.datamodule import RLHFDataModule

__all__ = ["RLHFDataModule", "concat_prompt_response", "get_task", "position_ids_from_mask"]
