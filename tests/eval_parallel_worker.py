"""``python -m leangen.eval`` with one rank made to fail while scoring, for
tests/test_eval_parallel.py (run under torchrun; not a test module itself).

LEANGEN_TEST_FAIL_RANK: the rank that fails (default 1). LEANGEN_TEST_FAIL: ``hang``
(the rank stops answering, as a stuck device would) or ``raise`` (a leangen error).
"""

import os
import sys
import time

from leangen.errors import LeangenError
from leangen.eval import main
from leangen.evaluation import perplexity


def fail(model, rows, targets):
    if os.environ.get("LEANGEN_TEST_FAIL") == "hang":
        time.sleep(3600)
    raise LeangenError("injected failure while scoring")


if __name__ == "__main__":
    if os.environ.get("RANK") == os.environ.get("LEANGEN_TEST_FAIL_RANK", "1"):
        perplexity.score_rows = fail
    sys.exit(main())
