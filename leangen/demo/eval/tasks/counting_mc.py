"""The documents of the counting_mc task, for lm-eval's ``custom_dataset``.

Read from counting_mc.jsonl next to this file, so the task runs offline from any
working directory (a relative ``data_files`` would be resolved against the working
directory). tools/make_eval_task.py writes the jsonl.
"""

import json
import pathlib


def load(**metadata):
    """The test split; lm-eval passes the task's metadata as keywords, unused here."""
    import datasets

    path = pathlib.Path(__file__).with_name("counting_mc.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
