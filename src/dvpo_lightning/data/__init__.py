"""Data: sources, formats, bad rows, tokenizers, tokenisation and split-layout collation."""

from dvpo_lightning.data.collate import concat_prompt_response, position_ids_from_mask

__all__ = ["concat_prompt_response", "position_ids_from_mask"]
