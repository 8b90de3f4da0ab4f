"""Data pipeline: tokenizers, JSONL -> indexed-dataset preprocessing, GPT dataset building."""
