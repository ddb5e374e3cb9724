import os
import sys

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
sys.path.insert(0, os.path.dirname(__file__))

import sbpatch

# In-process tests run with every installed library enabled from collection on (the shims must be in place before a
# test module imports advertorch or deeprobust); import-order tests use subprocesses.
sbpatch.enable()
