"""Where training runs: the CPU, strategies over devices and workers, which process is chief."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import tensorflow as tf

from .checks import check_positive_int


def cpu_info() -> dict:
    """This CPU: ``{"model": str, "flags": frozenset of str (Linux only), "cores": int}``."""
    import platform

    model, flags = "", frozenset()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return {"model": model, "flags": flags, "cores": os.cpu_count()}


def _tf_config() -> tuple[int, str, int] | None:
    """``(workers incl. chief, task type, task index)`` from ``$TF_CONFIG``, ``None`` if unset."""
    # TFConfigClusterResolver raises a bare JSONDecodeError on a typo and accepts an index
    # outside the cluster; this says what to fix.
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        n = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        task_type, task_index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"TF_CONFIG is not valid multi-worker JSON ({type(exc).__name__}: {exc}). It must "
            'look like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}, with this machine\'s own index; '
            "unset TF_CONFIG to train on one machine"
        ) from None
    if task_type not in cluster or not 0 <= task_index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG's task {task_type!r} #{task_index} is not in its cluster "
            f"{sorted(cluster)}; give each machine its own index into the worker list"
        )
    if "chief" not in cluster and task_type == "worker" and task_index == 0:
        task_type = "chief"  # worker 0 is the chief when the cluster names none
    return n, task_type, task_index


# Addresses whose gRPC server this process started: TensorFlow reuses it when a strategy is
# made again (a notebook cell run twice), so the port is taken by us, not by another process.
_SERVING: set[str] = set()


def _own_address() -> str:
    """This worker's ``host:port`` as TensorFlow reads ``$TF_CONFIG`` (lists or dicts)."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return str(resolver.cluster_spec().task_address(resolver.task_type, resolver.task_id))


def _check_own_port(address: str) -> None:
    """RuntimeError if ``address``'s port, this worker's, is held by another process."""
    # TensorFlow says only "UnknownError: Could not start gRPC server" there, and the other
    # workers wait for this one with no time limit.
    try:
        port = int(address.rpartition(":")[2])
    except ValueError:
        return  # TensorFlow's own parser has the last word on what a port is
    if address in _SERVING or not 0 < port < 65536:
        return
    with socket.socket() as probe:
        # Like TensorFlow's gRPC server: every interface, SO_REUSEADDR.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            raise RuntimeError(
                f"TF_CONFIG gives this worker the address {address}, but port {port} cannot "
                f"be taken here ({exc.strerror}): free it or give this worker another port in "
                "every worker's TF_CONFIG. The other workers wait for this one without a time "
                "limit: stop them and start all again"
            ) from None


def is_chief() -> bool:
    """Whether this process writes results, figures and exports (one machine, or the chief task)."""
    config = _tf_config()
    return config is None or config[1] == "chief"


def worker_run_dir(run_dir) -> Path:
    """This worker's checkpoint folder: ``run_dir``, or ``run_dir/worker-<index>`` if not chief."""
    run_dir = Path(run_dir)
    return run_dir if is_chief() else run_dir / f"worker-{_tf_config()[2]}"


def to_numpy(value) -> np.ndarray:
    """A variable or tensor as numpy; of a ``MirroredVariable`` or per-replica value, the first."""
    if isinstance(value, tf.distribute.DistributedValues):
        value = value.values[0]
    return np.asarray(tf.convert_to_tensor(getattr(value, "value", value)))


def any_worker(strategy, flag: bool) -> bool:
    """``flag`` or-ed over all workers of a multi-worker run (a collective: all must call it)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return flag
    votes = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` with a ``reduce`` that Keras 3.15's ``fit`` can use."""

    # fit reduces whole (images, labels) tuples, and scalars with axis=0; the multi-worker
    # strategy refuses both. Reduce each part, scalars with axis=None.
    def reduce(self, reduce_op, value, axis):
        parent = super()

        def one(v):
            local = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
            rank = tf.convert_to_tensor(local).shape.rank
            return parent.reduce(reduce_op, v, None if rank == 0 else axis)

        return tf.nest.map_structure(one, value)


def _split_cpu(n: int) -> list[str]:
    """Split the CPU into ``n`` logical devices (before TensorFlow starts); their names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) != n:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
            )
        except RuntimeError:
            raise RuntimeError(
                f"CIFAR_CPU_DEVICES={n} must take effect before TensorFlow starts: restart "
                "the kernel (or process) and call choose_strategy() before any other "
                "TensorFlow work"
            ) from None
    return [f"/cpu:{i}" for i in range(n)]


def choose_strategy(cpu_devices: int | None = None):
    """The ``tf.distribute`` strategy for the devices at hand; call it before other TF work.

    Multi-worker if ``$TF_CONFIG`` names 2+ workers, mirrored over 2+ GPUs (or ``cpu_devices``
    logical CPUs without a GPU), else one device.

    Args:
        cpu_devices: logical CPU devices (default ``$CIFAR_CPU_DEVICES``, else 1).

    Raises:
        ValueError: invalid ``$TF_CONFIG``, or ``cpu_devices`` not an int >= 1.
        RuntimeError: logical CPU devices asked for after TensorFlow started, or the port
            ``$TF_CONFIG`` gives this worker held by another process.
    """
    if cpu_devices is None:
        raw = os.environ.get("CIFAR_CPU_DEVICES", "").strip() or "1"
        cpu_devices = int(raw) if raw.isdigit() else raw
    cpu_devices = check_positive_int(cpu_devices, "CIFAR_CPU_DEVICES / cpu_devices")
    config = _tf_config()
    cpus = _split_cpu(cpu_devices) if cpu_devices > 1 else []
    if config is not None and config[0] > 1:
        address = _own_address()
        _check_own_port(address)
        strategy = _MultiWorkerMirroredStrategy()
        _SERVING.add(address)
        return strategy
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    if cpus and not gpus:
        return tf.distribute.MirroredStrategy(cpus)
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def global_batch_size(per_replica: int, strategy) -> int:
    """``per_replica`` times the replicas over all machines; ValueError if not an int >= 1."""
    return check_positive_int(per_replica, "per_replica batch size") * strategy.num_replicas_in_sync
