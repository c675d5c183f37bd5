"""The paper's experiments as runnable programs (``python -m declnet.apps.<name> ...``)."""
