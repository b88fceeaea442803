"""Training data: loading, prompt templates, tokenization, deterministic batching."""

from lowmem_tune.data.batching import BatchStream, calibration_sequences, collate, eval_batches, split_heldout
from lowmem_tune.data.examples import Example, load_examples, load_examples_and_format
from lowmem_tune.data.synthetic import generate_synthetic_boolq
from lowmem_tune.data.tokenize import IGNORE_INDEX, TruncationReport, tokenize_examples, train_local_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "BatchStream",
    "Example",
    "TruncationReport",
    "calibration_sequences",
    "collate",
    "eval_batches",
    "generate_synthetic_boolq",
    "load_examples",
    "load_examples_and_format",
    "split_heldout",
    "tokenize_examples",
    "train_local_tokenizer",
]
