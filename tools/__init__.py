"""Tools that work on the pipeline's results without being stages of it, run as `python -m tools.<name>`.

report: the pull-request report; label_efficiency: the label-efficiency sweep; dvc: the dvc CLI calls both share.
"""
