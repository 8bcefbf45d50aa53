"""Data of the ``tritonq_tiny_mc`` lm-eval task: the examples in ``tiny_mc.jsonl`` beside this file."""

import json
from pathlib import Path

EXAMPLES = Path(__file__).with_name("tiny_mc.jsonl")


def load_examples(**_metadata):
    """lm-eval passes the task's metadata as keyword arguments; the examples do not depend on it."""
    import datasets

    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
