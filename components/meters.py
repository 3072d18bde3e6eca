"""
The harness's meters: peak memory, FLOPs and time of one call.

- Peak memory. On CUDA: torch.cuda.max_memory_allocated during the call, minus what was allocated before it.
  On CPU PyTorch keeps no allocator statistics, so PeakMemory, a TorchDispatchMode, watches the outputs of every
  operator, including those autograd runs in the backward pass: each new tensor storage is added to a running
  total with its size and a weak reference to it, storages whose reference has expired (freed; tensors that
  autograd saved for backward stay alive until released) are subtracted, and the largest total after any
  operator is the peak. It counts what was allocated inside the call (not inputs or parameters that existed
  before) and cannot see scratch memory inside a single kernel.
- FLOPs: torch.utils.flop_counter, which counts matrix products (attention kernels included).
- Time: the best of a few runs, since other processes only ever add time.
"""
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """
    Peak bytes of tensor storage alive at once among those allocated inside the `with` block (see module doc).

    >>> with PeakMemory() as pm:
    ...     a = torch.ones(1000); b = a * 2; del a; c = b + 1
    >>> pm.peak   # two float32 vectors of 1000 alive at once
    8000
    """

    def __enter__(self):
        self.live, self.current, self.peak = {}, 0, 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()  # views and in-place results share their base's storage: counted once
                if storage.nbytes() and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn, device):
    """Peak bytes allocated while fn() runs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakMemory() as pm:
        fn()
    return pm.peak


# F.scaled_dot_product_attention's CPU kernel is missing from FlopCounterMode's table; count it like the GPU ones
_aten = torch.ops.aten
SDPA_CPU_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda go, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(go, q, k, v),
}


def count_flops(fn):
    """FLOPs of the matrix products fn() runs: (8 x 16) @ (16 x 4) -> 2 * 8 * 16 * 4 = 1024."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, reps):
    """(FLOPs, peak bytes, best-of-reps seconds) of fn(); the FLOP count doubles as the warmup run."""
    flops = count_flops(fn)
    peak = peak_memory(fn, device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return flops, peak, min(times)
