"""Write the demo's eval data into ``leangen/demo/eval/``.

    counting.txt              the text ``eval_demo`` measures perplexity on: counting
                              from one to ninety nine, the demo model's training data
    tasks/counting_mc.yaml    an lm-evaluation-harness multiple-choice task: given three
    tasks/counting_mc.jsonl   numbers counted in words, which number comes next?

The task is read through ``include_path`` and runs offline: its YAML loads the jsonl
through ``custom_dataset: !function counting_mc.load`` (tasks/counting_mc.py), because
lm-eval hands a relative ``data_files`` to ``datasets``, which resolves it against the
working directory rather than the YAML's folder.

The output is deterministic (random.Random(0) picks the answer's position). Run from
the repository root:

    python tools/make_eval_task.py [--out leangen/demo/eval]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

from make_demo import MAX_NUMBER, REPO_ROOT, count_from, number_words

TASK = "counting_mc"
CONTEXT_NUMBERS = 3  # numbers counted before the one to choose
# Distractors, nearest first: numbers a counting model might plausibly confuse.
DISTRACTOR_OFFSETS = (1, -2, 2, 10, -10, 3, -3, 11)
CHOICES = 4

TASK_YAML = f"""\
# {TASK}: which number comes next? Three numbers counted in English words, four
# choices. For the demo model (leangen/demo), which was trained to count.
# Written by tools/make_eval_task.py; edit that script, not this file.
# Offline: counting_mc.py reads counting_mc.jsonl from this folder (a relative
# data_files would be resolved against the working directory, not this folder).
# Run:
#   tune run leangen/eval --config eval_demo
#   lm_eval --model <backend> --model_args <args> --include_path <this folder> --tasks {TASK}
task: {TASK}
custom_dataset: !function {TASK}.load
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def distractors(n: int) -> list[int]:
    """Three wrong numbers near n. None is a word-prefix of the answer ("thirty" for
    "thirty two"), whose log-likelihood could never be lower than the answer's."""
    answer = number_words(n).split()
    picked = []
    for offset in DISTRACTOR_OFFSETS:
        d = n + offset
        words = number_words(d).split() if 1 <= d <= MAX_NUMBER else None
        if words and answer[:len(words)] != words and d not in picked:
            picked.append(d)
    return picked[:CHOICES - 1]


def documents(rng: random.Random) -> list[dict]:
    docs = []
    for n in range(CONTEXT_NUMBERS + 1, MAX_NUMBER + 1):
        choices = [n] + distractors(n)
        rng.shuffle(choices)
        docs.append({
            "context": count_from(n - CONTEXT_NUMBERS, n - 1),
            "choices": [number_words(c) for c in choices],
            "answer": choices.index(n),
        })
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "leangen" / "demo" / "eval",
                        help="output folder (default: leangen/demo/eval in the repo)")
    out = parser.parse_args(argv).out
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    # No final newline: the demo tokenizer has no newline piece (it would be <unk>).
    (out / "counting.txt").write_text(count_from(1))
    (out / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML)
    docs = documents(random.Random(0))
    (out / "tasks" / f"{TASK}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    print(f"wrote {out}: counting.txt, tasks/{TASK}.yaml, tasks/{TASK}.jsonl ({len(docs)} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
