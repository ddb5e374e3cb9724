"""The adapter: what sbpatch should wrap in ``mini_attacks``, as data. sbpatch finds it through the entry point
``sbpatch.integrations`` declared in pyproject.toml; ``sbpatch.enable()``, ``SBPATCH=all`` and ``status()`` then treat
it like a built-in one."""

from sbpatch.locate import argument, attribute
from sbpatch.patching import Integration, Target

INTEGRATION = Integration(
    name="mini_attacks",  # the name enable(), SBPATCH and status() use
    distribution="sbpatch-example-plugin",  # the installed distribution, for the version check
    module="sbpatch_example_plugin",  # its top-level import name
    supported=">=0.1,<1",
    targets=(
        Target("sbpatch_example_plugin.mini_attacks", "fgsm", argument(0, "model")),
        Target("sbpatch_example_plugin.mini_attacks", "PGD.__call__", attribute("model")),
    ),
)
