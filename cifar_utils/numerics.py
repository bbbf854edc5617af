"""How training computes: seeds and op determinism, precision (dtype policy), XLA."""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from .devices import cpu_info


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and TensorFlow, before building; ``deterministic``: op determinism too."""
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        # A seed then repeats on one machine (GPU sums vary otherwise); it rules XLA out.
        tf.config.experimental.enable_op_determinism()


#: ``MIXED_PRECISION`` values that force a precision -> Keras dtype policy.
PRECISION_POLICIES = {
    True: "mixed_float16",
    False: "float32",
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
    "float32": "float32",
}


def is_precision_setting(value) -> bool:
    """Whether ``value`` is a ``MIXED_PRECISION`` value: ``"auto"`` or a policy key."""
    return isinstance(value, bool | str) and (value == "auto" or value in PRECISION_POLICIES)


#: CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic: AVX512_BF16 or AMX.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _native(policy: str, cpu_flags, gpus: list) -> bool:
    """Whether this hardware computes ``policy`` natively (so at least as fast as float32)."""
    if policy == "mixed_float16":
        return bool(gpus) and all(cc and cc[0] >= 7 for cc in gpus)
    if policy == "mixed_bfloat16":
        if gpus:
            return all(cc and cc[0] >= 8 for cc in gpus)
        return bool(set(BF16_CPU_FLAGS) & set(cpu_flags))
    return True


def _gpu_capabilities() -> list:
    """Compute capability ``(major, minor)`` of each visible GPU, ``None`` where unknown."""
    return [
        tf.config.experimental.get_device_details(gpu).get("compute_capability")
        for gpu in tf.config.list_physical_devices("GPU")
    ]


#: Networks that train slower in bfloat16 than in float32 on CPUs, even with native bfloat16,
#: so "auto" keeps float32 for them on a CPU: notebook NAME -> the measurements
#: (benchmarks/throughput.py, docs/performance.md). GPUs are not measured.
CPU_FLOAT32_NETWORKS = {
    "efficientnet_b0": "its depthwise convolutions train slower in bfloat16 on CPUs: 10 -> 7 "
    "img/s on a Sapphire Rapids (AMX), 14 -> 11 on an EPYC with avx512_bf16",
}


def _auto_precision(cpu_flags, gpus: list, network: str | None) -> tuple[str, str]:
    """``(policy, reason)`` that ``MIXED_PRECISION = "auto"`` picks for this hardware."""
    if gpus:
        if not all(gpus):
            return "float32", "a GPU whose compute capability TensorFlow does not report"
        major, minor = min(tuple(cc) for cc in gpus)
        cc = f"GPU compute capability {major}.{minor}"
        if _native("mixed_bfloat16", cpu_flags, gpus):
            return "mixed_bfloat16", f"{cc} (8.0 or newer: native bfloat16)"
        if _native("mixed_float16", cpu_flags, gpus):
            return "mixed_float16", f"{cc} (7.x: float16 tensor cores, with loss scaling)"
        return "float32", f"{cc} (below 7.0: no fast low-precision units)"
    if not cpu_flags:
        return "float32", "no GPU, and the CPU's flags are unknown (no /proc/cpuinfo)"
    if _native("mixed_bfloat16", cpu_flags, gpus):
        native = ", ".join(sorted(set(BF16_CPU_FLAGS) & set(cpu_flags)))
        if network in CPU_FLOAT32_NETWORKS:
            return "float32", f"no GPU; for {network}, {CPU_FLOAT32_NETWORKS[network]}"
        return "mixed_bfloat16", f"no GPU; the CPU has native bfloat16 ({native})"
    return "float32", (
        "no GPU, and the CPU has no avx512_bf16 or amx_bf16 flag (bfloat16 would be emulated "
        "and slower)"
    )


def choose_precision(
    setting="auto", *, network=None, resumed=None, cpu_flags=None, gpus=None
) -> tuple[str, str]:
    """The Keras dtype policy for ``MIXED_PRECISION``, and why: ``(policy, reason)``.

    Args:
        setting: ``"auto"``, ``True``/``"float16"``, ``"bfloat16"`` or ``False``/``"float32"``.
        network: the notebook's ``NAME`` (e.g. ``"efficientnet_b0"``): "auto" keeps float32 on
            a CPU for those in :data:`CPU_FLOAT32_NETWORKS`.
        resumed: the dtype policy of the run being resumed (``recorded_precision``), which
            "auto" keeps, so a resume never trains on in another precision.
        cpu_flags: the CPU's flags (default :func:`cpu_info`'s).
        gpus: ``(major, minor)`` compute capability per GPU, ``None`` if unknown; ``[]``: none.

    Raises:
        ValueError: ``setting`` is none of the six values.
    """
    gpus = _gpu_capabilities() if gpus is None else list(gpus)
    cpu_flags = cpu_info()["flags"] if cpu_flags is None else frozenset(cpu_flags)
    auto, why = _auto_precision(cpu_flags, gpus, network)
    if resumed is not None:
        auto, why = resumed, "the run it resumes trained under it"
    if isinstance(setting, str) and setting == "auto":
        return auto, f'MIXED_PRECISION = "auto": {why}'
    if not is_precision_setting(setting):
        raise ValueError(
            f'MIXED_PRECISION = {setting!r}: must be "auto" (decide from the hardware), '
            'True or "float16", "bfloat16", or False or "float32"'
        )
    return PRECISION_POLICIES[setting], (
        f'MIXED_PRECISION = {setting!r} forces it; "auto" would pick {auto} here ({why})'
    )


def configure_precision(
    setting="auto", *, network=None, resumed=None, cpu_flags=None, gpus=None
) -> str:
    """Set and print Keras' global dtype policy for ``MIXED_PRECISION``, before building models.

    Args and Raises as :func:`choose_precision`; returns the policy. Warns if not native here.
    """
    gpus = _gpu_capabilities() if gpus is None else list(gpus)
    cpu_flags = cpu_info()["flags"] if cpu_flags is None else frozenset(cpu_flags)
    policy, reason = choose_precision(
        setting, network=network, resumed=resumed, cpu_flags=cpu_flags, gpus=gpus
    )
    print(f"Precision: {policy} ({reason})")
    if not _native(policy, cpu_flags, gpus):
        where = "a CPU" if not gpus else "this GPU"
        warnings.warn(
            f"{policy} on {where} without native {policy.removeprefix('mixed_')} runs slower "
            'than float32, not faster. Set MIXED_PRECISION = "auto" here.',
            stacklevel=2,
        )
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _op_determinism() -> bool:
    from tensorflow.python.framework.config import is_op_determinism_enabled

    return is_op_determinism_enabled()  # what Keras' model_supports_jit reads


def xla_decision(xla) -> tuple[bool, str]:
    """``(jit_compile, reason)``: whether ``model.compile`` will really use XLA for ``xla``.

    Raises:
        ValueError: ``xla`` is none of ``True``, ``False``, ``"auto"``.
    """
    if not (isinstance(xla, bool) or xla == "auto"):
        raise ValueError(f'XLA must be True, False or "auto", not {xla!r}')
    if xla is False:
        return False, "XLA = False"
    # "auto": on only with a GPU; XLA slowed this project's CPU benchmark.
    if xla == "auto" and not tf.config.list_physical_devices("GPU"):
        return False, 'XLA = "auto" on a CPU, where XLA made training slower'
    if _op_determinism():  # Keras resets jit_compile here, blaming the model (keras#22621)
        return False, (
            f"XLA = {xla!r}, but op determinism (DETERMINISTIC = True) keeps Keras from "
            "compiling with XLA; set DETERMINISTIC = False to use it"
        )
    return True, f"XLA = {xla!r}" + (" with a GPU" if xla == "auto" else "")


def resolve_jit_compile(xla) -> bool:
    """Print whether XLA is on and why; return ``jit_compile``. Call after :func:`seed_everything`.

    Raises:
        ValueError: ``xla`` is none of ``True``, ``False``, ``"auto"``.
    """
    on, why = xla_decision(xla)
    print(f"XLA: {'on' if on else 'off'} ({why})")
    return on
