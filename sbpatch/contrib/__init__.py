"""One module per attack library, each declaring an ``INTEGRATION`` (see ``sbpatch.patching.Integration``)."""
