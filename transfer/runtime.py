"""Where and how training runs: the tf.distribute distribution, seeds, determinism, precision, XLA.

The workaround that lets Keras 3's fit() train across replicas and workers is in transfer/keras_workarounds.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import keras
import tensorflow as tf

from transfer.config import Training
from transfer.errors import PipelineError


@dataclass(frozen=True)
class Runtime:
    gpus: int
    mixed_precision: bool
    jit_compile: bool
    distribution: tf.distribute.Strategy
    distribute: str  # none | mirrored | multi_worker, after resolving auto
    workers: int
    chief: bool  # only the chief writes models, metrics and checkpoints
    # The feature cache's one pass in bfloat16 while the model computes in float32 (benchmarks only): faster with
    # AMX, but every score would then be of features the saved model does not compute, so the product never sets it.
    frozen_pass_bfloat16: bool = False

    @property
    def replicas(self) -> int:
        return self.distribution.num_replicas_in_sync


def set_up(training: Training, seed: int) -> Runtime:
    """Pick the distribution strategy, seed everything, pick mixed precision and XLA (auto: on with a GPU).

    Call it before anything else touches TensorFlow: MultiWorkerMirroredStrategy
    must exist before TensorFlow starts its runtime.
    """
    workers, chief = cluster()
    gpus = len(tf.config.list_physical_devices("GPU"))
    distribute = training.distribute
    if distribute == "auto":
        distribute = "multi_worker" if workers > 1 else "mirrored" if gpus > 1 else "none"
    if distribute == "multi_worker":
        distribution = tf.distribute.MultiWorkerMirroredStrategy()
    elif distribute == "mirrored":
        # One replica per GPU; without GPUs, one per (logical) CPU device.
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        distribution = tf.distribute.MirroredStrategy([device.name for device in devices])
    else:
        distribution = tf.distribute.get_strategy()
    keras.utils.set_random_seed(seed)
    if training.deterministic:
        tf.config.experimental.enable_op_determinism()
    policy = mixed_policy(training.mixed_precision, gpus)
    # Keras silently turns XLA off under op determinism (not every XLA kernel is deterministic).
    if training.jit_compile is True and training.deterministic:
        raise PipelineError("training.jit_compile=true needs training.deterministic=false: "
                            "Keras does not compile with XLA under TF op determinism")
    jit = bool(gpus) and not training.deterministic if training.jit_compile == "auto" else training.jit_compile
    keras.mixed_precision.set_global_policy(policy)
    if distribute != "multi_worker":  # every process trains on its own
        workers, chief = 1, True
    runtime = Runtime(gpus, policy != "float32", jit, distribution, distribute, workers, chief)
    if runtime.replicas > 1:
        print(f"training with {distribute} over {runtime.replicas} replicas on {runtime.workers} worker(s)"
              + ("" if chief else "; the chief writes every output"))
    return runtime


def mixed_policy(mixed_precision: str | bool, gpus: int) -> str:
    """The Keras dtype policy that training.mixed_precision names on a machine with `gpus` GPUs.

    float16 is far slower than float32 on a CPU; bfloat16 has hardware support on recent ones
    (AVX512-BF16, AMX): see BENCHMARKS.md, "Mixed precision on the CPU". A dtype named outright is used on
    any device, so that a CPU can run what a GPU would (float16, with its loss-scaling optimizer).
    """
    if mixed_precision in ("float16", "bfloat16"):
        return f"mixed_{mixed_precision}"
    if mixed_precision is False or (mixed_precision == "auto" and not gpus):
        return "float32"
    return "mixed_float16" if gpus else "mixed_bfloat16"


def cluster() -> tuple[int, bool]:
    """(workers that TF_CONFIG names, whether this process is the chief); (1, True) without TF_CONFIG."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 1, True
    try:
        config = json.loads(raw)
        jobs = config.get("cluster", {})
        task_type, index = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise PipelineError(f"TF_CONFIG is not a valid cluster description ({error!r}); see docs/scaling-out.md") \
            from None
    workers = len(jobs.get("chief", [])) + len(jobs.get("worker", []))
    # Without a "chief" job, worker 0 is the chief (TensorFlow's own rule).
    chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in jobs)
    return workers, chief


def global_batch(batch_size: int, runtime: Runtime) -> int:
    """params' batch sizes are per replica: every replica gets batch_size images per step."""
    return batch_size * runtime.replicas


def by_batch(data: tf.data.Dataset) -> tf.data.Dataset:
    """Workers split the data batch by batch, never shard file by file.

    Every worker then reads all shards and keeps its part of each batch, so all
    take the same number of steps (shards differ in size) and the cardinality
    the readers assert stays true.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return data.with_options(options)
