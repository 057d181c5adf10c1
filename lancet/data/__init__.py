"""Data layer: read files into Records, adapt the public safety data sets, tokenize with loss labels."""

from lancet.data.adapters import load_dataset_spec, read_harmful_prompts, read_hh_rlhf, read_safety_tuned_llamas
from lancet.data.readers import FORMATS, detect_format, read_records, records_from_rows
from lancet.data.records import ROLES, Record, content_id
from lancet.data.tokenize import (
    EncodedDataset,
    collate,
    encode_prompt,
    encode_record,
    encode_records,
    has_response_tokens,
    length_stats,
    require_response_tokens,
)

__all__ = [
    "FORMATS",
    "ROLES",
    "EncodedDataset",
    "Record",
    "collate",
    "content_id",
    "detect_format",
    "encode_prompt",
    "encode_record",
    "encode_records",
    "has_response_tokens",
    "length_stats",
    "load_dataset_spec",
    "read_harmful_prompts",
    "read_hh_rlhf",
    "read_records",
    "read_safety_tuned_llamas",
    "records_from_rows",
    "require_response_tokens",
]
