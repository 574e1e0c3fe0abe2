"""Shared code of the transfer-learning pipeline; the stages live in `stages/`."""

import os

# TensorFlow's C++ start-up notices (oneDNN, CPU features) would bury our one-line errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
