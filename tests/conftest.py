import os
import sys

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import sbpatch
from sbpatch.bench.text import offline

# Tiny models on a shared 2-core CI machine: one intra-op thread is both faster (no thread synchronisation swamping
# microsecond kernels: the zoo took 10x longer with two) and steadier. Subprocess tests choose their own.
torch.set_num_threads(1)

# The text libraries must never download (NLTK data, TextAttack's post-install fetch, Hugging Face), whichever test
# imports them first, subprocesses included: a stop-word folder and cache written by sbpatch.bench.text.offline().
offline()

# In-process tests run with every installed library enabled from collection on (the shims must be in place before a
# test module imports advertorch or deeprobust); import-order tests use subprocesses.
sbpatch.enable()


@pytest.fixture(autouse=True)
def no_parameter_left_held():
    """One failure stays one failure: a test that leaves parameters held (a lost release) fails here, and the ledger
    is reset (sbpatch.release_all) so the tests after it start clean."""
    yield
    from sbpatch import freeze

    held = freeze.held_count()
    if held:
        sbpatch.release_all()
        pytest.fail(f"sbpatch still held {held} parameter(s) after the test; released them for the next tests")
