"""The tf.distribute strategy of one trial: MirroredStrategy over its devices.

With GPUs, every visible GPU is a replica (Ray and SLURM make only a trial's own GPUs
visible). Without, `cpu_replicas` logical CPU devices stand in for them, which is how
the multi-replica path runs in tests and on laptops.
"""

from __future__ import annotations

import tensorflow as tf

from organtrain.errors import OrgantrainError


def make_strategy(
    cpu_replicas: int = 1, expected_replicas: int | None = None
) -> tf.distribute.Strategy:
    gpus = tf.config.list_physical_devices("GPU")
    cross_device_ops = None  # across GPUs, MirroredStrategy's own choice
    if gpus:
        devices = [f"/gpu:{i}" for i in range(len(gpus))]
    else:
        _ensure_logical_cpus(cpu_replicas)
        devices = [f"/cpu:{i}" for i in range(cpu_replicas)]
        # Its default over CPUs, collective all-reduce, numbers its collectives from the
        # same keys in every MirroredStrategy: a second model of other shapes trained in the
        # same process (a test session; a Tune worker reused for another trial) failed with
        # "Shape mismatch in the collective instance". Summing on one device has no keys.
        cross_device_ops = tf.distribute.ReductionToOneDevice()
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
    if expected_replicas is not None and strategy.num_replicas_in_sync != expected_replicas:
        raise OrgantrainError(
            f"asked for {expected_replicas} replicas but {strategy.num_replicas_in_sync} devices "
            f"are available ({', '.join(devices)}); a silent single-device run would be misleading"
        )
    return strategy


def _ensure_logical_cpus(n: int) -> None:
    """Split the CPU into n logical devices; only possible before TensorFlow starts."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    configured = tf.config.get_logical_device_configuration(cpu)  # does not start TF
    if configured and len(configured) >= n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n
        )
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) >= n:
            return
        raise OrgantrainError(
            f"cannot split the CPU into {n} logical devices: TensorFlow already started in this "
            "process; set train.cpu_replicas before any TensorFlow work runs"
        ) from None
