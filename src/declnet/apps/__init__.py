"""The paper's experiments as runnable programs.

Each experiment is a sub-package run with ``python -m declnet.apps.<name>``; the heavy
dependencies they need (h5py, matplotlib, tqdm, scikit-learn) come with the ``[apps]`` extra
and are imported only when an experiment needs them.
"""
