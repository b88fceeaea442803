"""lowmem-tune: full-parameter-quality finetuning of 7B-class LLMs on one consumer GPU."""

__version__ = "0.1.0"
