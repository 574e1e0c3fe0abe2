#!/usr/bin/env bash
# What TF op determinism costs: the pretrain stage of the CPU profile (full CIFAR-10, small_cnn at 32 px, no XLA,
# 3 epochs) with train.deterministic true and false, twice each, in a throwaway copy of the project.
# Usage: bash benchmarks/determinism.sh [folder]   (run from the project root, with the venv active)
set -euo pipefail
root=$(pwd)
work=${1:-$(mktemp -d)}
python - "$root" "$work/p" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[1]) / "tests"))
from helpers import make_project
make_project(Path(sys.argv[2]), (Path(sys.argv[1]) / "../shared/datasets/cifar-10-python.tar.gz").resolve(), {
    "pretrain.epochs": 3, "pretrain.batch_size": 32, "pretrain.learning_rate": 0.0005,
    "train.steps_per_execution": 15, "train.shuffle_buffer": 10000, "train.jit_compile": False,
    "model.head_units": 128}, git=False)
PY
cd "$work/p"
for stage in download split preprocess; do python -m stages.$stage > /dev/null; done
for order in "true false" "false true"; do
  for deterministic in $order; do
    rm -rf checkpoints
    sed -i "s/deterministic: .*/deterministic: $deterministic/" params.yaml
    python -m stages.pretrain > /dev/null 2>&1
    python -c "import json; m = json.load(open('metrics/pretrain.json'));
print('deterministic=$deterministic', m['timing']['train_images_per_second'], 'img/s, test accuracy', m['test']['accuracy'])"
  done
done
