"""How much memory this process may still take: a container's limit, not the host's free RAM.

`psutil.virtual_memory().available` reports the host's memory. Inside a cgroup-limited
container (Docker, Kubernetes, a Slurm job) the kernel kills the process at its group's limit
long before the host runs short, so a choice made on the host's figure (load a 3 GB checkpoint
in memory under a 1.5 GiB limit) ends in an OOM kill (exit 137) instead of a streamed run.

This reads the limit the way the kernel applies it: the process's group (from
/proc/self/cgroup) and every ancestor up to the hierarchy's mount can carry a limit (a
Kubernetes pod and its container, a Slurm job and its step), and the tightest one, minus what
that group already uses, is what is left. cgroup v2 (`memory.max`, "max" = none;
`memory.current`) and v1 (`memory.limit_in_bytes`, where a huge value means none;
`memory.usage_in_bytes`) are both read. Usage counts page cache, which the kernel reclaims
before it kills anything: the inactive file pages (`memory.stat`) are not counted as used, as
`docker stats` and the kubelet do. A container with its own cgroup namespace (or a v1 mount of
just its group) sees its group at the mount itself, where the path /proc/self/cgroup names
does not exist: the mount is then the group.
"""

from __future__ import annotations

from pathlib import Path

#: Where the hierarchies are mounted: (mount below the root, limit file, usage file, memory.stat's reclaimable key).
_V2 = ("sys/fs/cgroup", "memory.max", "memory.current", "inactive_file")
_V1 = ("sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
#: v1 writes "no limit" as the largest page-aligned value (about 2**63); anything this large is no limit.
_UNLIMITED = 2**62


def _read_bytes(path: Path) -> int | None:
    """A byte count from a cgroup file; None when it is absent, unreadable, "max" or unlimited."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= _UNLIMITED:
        return None
    return int(text)


def _reclaimable(stat: Path, key: str) -> int:
    """Page cache the kernel drops before it kills anything (`key` in memory.stat); 0 if unknown."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _membership(root: Path) -> dict[str, str]:
    """This process's group path per hierarchy: "v2" (the `0::` line) and "v1" (the memory controller's line)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if parts[0] == "0" and controllers == "":
            found["v2"] = path
        elif "memory" in controllers.split(","):
            found["v1"] = path
    return found


def _group_and_ancestors(mount: Path, path: str) -> list[Path]:
    """The group's directory and each ancestor up to `mount`, innermost first (just the mount when
    the path is not below it: a cgroup namespace, or a mount of the group itself)."""
    parts = [p for p in path.split("/") if p]
    group = mount.joinpath(*parts)
    if ".." in parts or not group.is_dir():
        return [mount]
    return [group, *[mount.joinpath(*parts[:n]) for n in range(len(parts) - 1, -1, -1)]]


def cgroup_available_bytes(root: Path = Path("/")) -> int | None:
    """Bytes this process may still allocate under its cgroup memory limits; None when none applies.

    `root` is where /proc and /sys are found (tests point it at fake files).
    """
    membership = _membership(root)
    left: list[int] = []
    for version, (mount, limit_file, usage_file, reclaimable_key) in (("v2", _V2), ("v1", _V1)):
        if version not in membership or not (root / mount).is_dir():
            continue
        for directory in _group_and_ancestors(root / mount, membership[version]):
            limit = _read_bytes(directory / limit_file)
            if limit is None:
                continue
            usage = (_read_bytes(directory / usage_file) or 0) - _reclaimable(directory / "memory.stat", reclaimable_key)
            left.append(max(0, limit - max(0, usage)))
    return min(left) if left else None
