import os
import sys

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
sys.path.insert(0, os.path.dirname(__file__))

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
