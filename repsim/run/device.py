"""Where and how the run computes: device, precision of the forwards, TF32, threads.

The forwards may run under autocast (bf16/fp16); every metric receives float32 features and the
engine keeps float64 sums. On Apple's MPS, which has no float64, the engine runs on the host
(the forwards stay on the GPU; only reduced features cross), so the sums keep float64 accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

from repsim.errors import DeviceError
from repsim.threads import available_cores

if TYPE_CHECKING:
    import torch

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device
    that is asked for and absent is a :class:`DeviceError` naming it."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"run.device = '{name}' is not a device; use auto, cpu, cuda, cuda:N "
                          "or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"run.device = '{name}' was asked for, but this torch "
                              f"({torch.__version__}) sees no CUDA device. Use device = 'cpu' "
                              "(or 'auto'), or install a CUDA build of torch on a GPU machine.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"run.device = '{name}' was asked for, but there are {count} CUDA "
                              f"devices (cuda:0 .. cuda:{count - 1}).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"run.device = '{name}' was asked for, but MPS is not available here. "
                          "Use device = 'cpu' or 'auto'.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"run.device = '{name}': repsim runs on cpu, cuda or mps.")
    return device


@dataclass(frozen=True)
class DeviceSettings:
    """The run's device, forward precision, TF32 switch, cache dtype and thread count."""

    device: torch.device
    precision: str = "fp32"  # fp32 | bf16 | fp16
    tf32: bool = False
    cache_dtype: str = "float32"
    threads: int = 1

    @classmethod
    def from_run(cls, run: Any, local_rank: int = 0, local_size: int = 1) -> DeviceSettings:
        """Settings of a recipe's ``[run]`` section for one process of ``local_size`` on its
        machine: each gets its own GPU (``cuda`` means ``cuda:LOCAL_RANK``) and a share of the
        cores."""
        import torch

        device = resolve_device(run.device)
        if device.type == "cuda" and device.index is None and local_size > 1:
            count = torch.cuda.device_count()
            if count > 1 and local_rank >= count:
                raise DeviceError(
                    f"process {local_rank} of {local_size} on this machine has no GPU of its own "
                    f"({count} visible): start at most that many processes per machine "
                    "(--nproc / --nproc-per-node).")
            # One visible GPU: the launcher gave each process its own (srun --gpus-per-task).
            device = torch.device("cuda", local_rank if count > 1 else 0)
        if run.precision == "fp16" and device.type == "cpu":
            raise DeviceError("run.precision = 'fp16' on the CPU: CPU autocast computes in "
                              "bfloat16 only. Use precision = 'bf16' or 'fp32' there.")
        threads = run.threads or max(1, available_cores() // local_size)
        return cls(device, run.precision, run.tf32, run.cache_dtype, threads)

    @property
    def engine_device(self) -> torch.device:
        """Where the similarity engine runs: the run's device, except MPS (no float64)."""
        import torch

        return torch.device("cpu") if self.device.type == "mps" else self.device

    def autocast(self) -> ContextManager[Any]:
        """Autocast for the forwards only (nothing for fp32)."""
        import torch

        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, _AUTOCAST[self.precision]))

    @property
    def cache_torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, _DTYPES[self.cache_dtype])

    def describe(self) -> dict[str, Any]:
        """What provenance records."""
        import torch

        out: dict[str, Any] = {"device": str(self.device), "precision": self.precision,
                               "tf32": self.tf32, "cache_dtype": self.cache_dtype,
                               "threads": self.threads, "engine_device": str(self.engine_device)}
        if self.device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(self.device)
            out["cuda"] = torch.version.cuda
        return out


@contextmanager
def configured(settings: DeviceSettings) -> Iterator[None]:
    """Apply the thread count and the TF32 switch for the run; restore them after."""
    import torch

    threads = torch.get_num_threads()
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_num_threads(settings.threads)
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    torch.backends.cudnn.allow_tf32 = settings.tf32
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def out_of_memory(settings: DeviceSettings, batch_size: int, what: str) -> DeviceError:
    """The message for a device that ran out of memory."""
    return DeviceError(
        f"device '{settings.device}' ran out of memory {what} at run.batch_size = {batch_size} "
        f"(precision {settings.precision}). Lower run.batch_size (the metrics' estimator "
        "minibatch is their own `batch_size` and does not change), use precision = 'bf16', "
        "select fewer or smaller layers, or run on a device with more memory.")
