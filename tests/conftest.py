import os
import sys

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
sys.path.insert(0, os.path.dirname(__file__))

import sbpatch
from sbpatch.bench.text import offline

# The text libraries must never download (NLTK data, TextAttack's post-install fetch, Hugging Face), whichever test
# imports them first, subprocesses included: a stop-word folder and cache written by sbpatch.bench.text.offline().
offline()

# In-process tests run with every installed library enabled from collection on (the shims must be in place before a
# test module imports advertorch or deeprobust); import-order tests use subprocesses.
sbpatch.enable()
