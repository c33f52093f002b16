"""How much device memory a decode may use, and the CUDA allocator settings that make pinned
host memory fast. The decodes (tiled and full) plan their work from these; nothing here changes
a number."""
import os
import re
from pathlib import Path
from typing import Optional

import torch

BUDGET_FRACTION = 0.8  # of the memory available when decoding starts
DEFAULT_POOL = (0, 0)  # the allocator's own pool; CUDA graphs allocate from private ones


def in_default_pool(segment) -> bool:
    """Whether a segment of `torch.cuda.memory_snapshot()` is the allocator's own, not a
    private pool's (CUDA graphs)."""
    return tuple(segment.get("segment_pool_id", DEFAULT_POOL)) == DEFAULT_POOL


def unused_bytes(segments) -> int:
    """Bytes of the segments' inactive blocks."""
    return sum(s["total_size"] - s["active_size"] for s in segments)


def reusable_cached_bytes(segments, device_index: int, stream: Optional[int] = None) -> int:
    """Bytes torch's CUDA allocator holds unused that the decode's allocations could take: the
    inactive blocks of the default pool's segments on `stream` (the decode's; None: any), and
    other streams' wholly unused segments, which the allocator frees and reallocates when it
    runs short. A partly used segment of another stream keeps its free blocks for that stream.
    A private pool's free blocks are excluded: they belong to its CUDA graphs (a compiled
    UNet's intermediates between replays), and counting them made a decode plan for memory it
    could not get."""
    return unused_bytes(s for s in segments
                        if s.get("device", device_index) == device_index and in_default_pool(s)
                        and (stream is None or s.get("stream", stream) == stream
                             or s["active_size"] == 0))


def cuda_index(device: torch.device) -> int:
    """The GPU number of a CUDA device (`cuda` alone: the current one): torch's memory-limit
    calls (set_per_process_memory_fraction, ...) refuse a device without one."""
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_available_bytes(device: torch.device) -> int:
    """Free device memory, within the per-process limit when one is set
    (`torch.cuda.set_per_process_memory_fraction`), plus the default pool's reusable cache."""
    index = cuda_index(device)
    free, total = torch.cuda.mem_get_info(index)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(index) if get_fraction else 1.0
    if fraction < 1:  # the allocator refuses to reserve beyond fraction * total
        free = min(free, max(int(fraction * total) - torch.cuda.memory_reserved(index), 0))
    stream = torch.cuda.current_stream(index).cuda_stream
    return free + reusable_cached_bytes(torch.cuda.memory_snapshot(), index, stream)


def available_bytes(device: torch.device) -> int:
    """Memory a decode could use now: on CUDA `cuda_available_bytes`, else the host's available
    memory, within the container's (cgroup's) memory limit where one is set."""
    if device.type == "cuda":
        return cuda_available_bytes(device)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        host = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limited = cgroup_available_bytes()
    return host if limited is None else min(host, limited)


# cgroup files: v2's unified hierarchy, v1's memory controller (limit, usage, reclaimable cache)
CGROUP_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}
NO_LIMIT = 2**60  # v1 reports "no limit" as a page-rounded 2**63


def cgroup_available_bytes(root="/sys/fs/cgroup", membership="/proc/self/cgroup") -> Optional[int]:
    """What this process's memory cgroup (a container's, a batch job's) still allows: the
    tightest limit minus usage, page cache that can be reclaimed counted as free, over the
    cgroup and its parents. None where no limit is set or none can be read. The host's
    MemAvailable ignores these limits, and a decode planned from it gets killed silently."""
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        return None
    tightest = None
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        version = 2 if controllers == "" else 1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        base = Path(root) if version == 2 else Path(root) / "memory"
        for folder in _with_parents(base, path):
            room = _cgroup_room(folder, *CGROUP_FILES[version])
            if room is not None:
                tightest = room if tightest is None else min(tightest, room)
    return tightest


def _with_parents(base: Path, path: str):
    """base/path and its parents up to base (inside a container the path is often '/')."""
    parts = [p for p in path.split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _cgroup_room(folder: Path, limit_file: str, usage_file: str, cache_key: str):
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= NO_LIMIT:
            return None
        usage = int((folder / usage_file).read_text())
    except (OSError, ValueError):
        return None
    try:
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        cache = int(stat.get(cache_key, 0))
    except (OSError, ValueError):
        cache = 0
    return max(int(limit) - usage + cache, 0)


def default_budget(device: torch.device) -> int:
    return int(BUDGET_FRACTION * available_bytes(device))


# Pinned host blocks made with malloc + cudaHostRegister on several threads rather than one
# cudaHostAlloc each: an H200's host pinned 60 GB so in 6.2 s, where cudaHostAlloc took 9.4 s
# for 19.5 GB (9.4 s of the cold 4096² decode's 12.7 s under a 10 GB budget). The allocator's
# settings are process-wide, so the CLI asks for this (`fast_pinned_allocator_conf`), not
# the decode.
PINNED_REGISTER_THREADS = 16


def fast_pinned_allocator_conf(environ, torch_version: str, cpus: int):
    """(variable, value) that makes torch's pinned allocator register host memory on threads,
    to set before CUDA starts; None where torch has no such option (before 2.2) or the user's
    allocator settings (in the variable this torch reads) already choose pinned_* options.
    Other settings of the user's are kept."""
    major_minor = tuple(int(n) for n in re.findall(r"\d+", torch_version)[:2])
    if major_minor < (2, 2):
        return None
    # torch 2.9 reads PYTORCH_ALLOC_CONF first, and the old name only where that is unset;
    # older releases read the old name alone
    names = ("PYTORCH_ALLOC_CONF",) * (major_minor >= (2, 9)) + ("PYTORCH_CUDA_ALLOC_CONF",)
    name = next((n for n in names if environ.get(n)), names[-1])
    current = environ.get(name, "")
    if "pinned_" in current:
        return None
    # the allocator takes a power of two
    threads = 1 << (min(PINNED_REGISTER_THREADS, max(cpus, 1)).bit_length() - 1)
    ours = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"
    return name, f"{current},{ours}" if current else ours
