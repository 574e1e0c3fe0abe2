#!/usr/bin/env bash
# What TF op determinism costs: the pretrain stage of the CPU profile (full CIFAR-10, small_cnn at 32 px, no XLA,
# 3 epochs) with training.deterministic true and false, twice each, in a throwaway copy of the project.
# Usage: bash benchmarks/determinism.sh [folder]   (run from the project root, with the venv active)
set -euo pipefail
work=${1:-$(mktemp -d)}
# The workspace and its data as every benchmark builds them (benchmarks/common.py), at profiles/cpu.args' settings;
# the stages' messages are not the result.
python - "$work" > /dev/null <<'PY'
import sys
from benchmarks.common import arguments, run_stages, workspace
args = arguments("determinism").parse_args(["--workdir", sys.argv[1]])
workspace("p", args, {"model.backbone": "small_cnn", "model.weights": "none", "preprocess.image_size": 32,
                      "preprocess.encoding": "raw", "pretrain.learning_rate": 0.0005, "pretrain.epochs": 3,
                      "training.jit_compile": False})
run_stages("download", "split", "preprocess")
PY
cd "$work/p"
for order in "true false" "false true"; do
  for deterministic in $order; do
    rm -rf checkpoints
    sed -i "s/deterministic: .*/deterministic: $deterministic/" params.yaml
    python -m stages.pretrain > /dev/null 2>&1
    python -c "import json; m = json.load(open('metrics/pretrain.json'));
print('deterministic=$deterministic', m['timing']['train_images_per_second'], 'img/s, test accuracy', m['test']['accuracy'])"
  done
done
