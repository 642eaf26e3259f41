"""The memory a run may use is the container's cgroup limit, not the host's free RAM (issue 20 item 9)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

import moe_compress.source.open as io_open
from moe_compress import CalibrationSpec, compress
from moe_compress.source.checkpoint import Checkpoint
from moe_compress.source.memory_limit import cgroup_available_bytes
from tiny_checkpoints import save_tiny_checkpoint, write_calibration

GIB = 2**30


def _fake(root: Path, membership: str, files: dict[str, str]) -> Path:
    """A fake /proc/self/cgroup (`membership`) and cgroup files (path below root -> content)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(membership)
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    return root


V2_JOB = "sys/fs/cgroup/slurm/job_7"


def test_v2_limit_minus_usage_and_reclaimable_page_cache(tmp_path):
    root = _fake(tmp_path, "0::/slurm/job_7\n", {
        f"{V2_JOB}/memory.max": f"{2 * GIB}\n",
        f"{V2_JOB}/memory.current": f"{GIB // 2}\n",
        f"{V2_JOB}/memory.stat": f"anon 100\nfile 999\ninactive_file {GIB // 4}\nactive_file 5\n",
        "sys/fs/cgroup/slurm/memory.max": "max\n",
    })
    assert cgroup_available_bytes(root) == 2 * GIB - (GIB // 2 - GIB // 4)


def test_v2_max_everywhere_is_no_limit(tmp_path):
    root = _fake(tmp_path, "0::/slurm/job_7\n", {f"{V2_JOB}/memory.max": "max\n", f"{V2_JOB}/memory.current": "123\n"})
    assert cgroup_available_bytes(root) is None


def test_v2_an_ancestors_tighter_limit_binds(tmp_path):
    """A Kubernetes pod's limit binds its containers, whatever their own limits say."""
    root = _fake(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "sys/fs/cgroup/kubepods/pod1/ctr/memory.max": f"{8 * GIB}\n",
        "sys/fs/cgroup/kubepods/pod1/ctr/memory.current": f"{GIB}\n",
        "sys/fs/cgroup/kubepods/pod1/memory.max": f"{3 * GIB}\n",
        "sys/fs/cgroup/kubepods/pod1/memory.current": f"{2 * GIB}\n",
        "sys/fs/cgroup/kubepods/memory.max": "max\n",
    })
    assert cgroup_available_bytes(root) == GIB


def test_v2_inside_a_cgroup_namespace_the_mount_is_the_group(tmp_path):
    """Docker with its own cgroup namespace: /proc/self/cgroup says '/' and the limit sits at the mount."""
    root = _fake(tmp_path, "0::/\n", {"sys/fs/cgroup/memory.max": f"{GIB}\n", "sys/fs/cgroup/memory.current": f"{GIB // 4}\n"})
    assert cgroup_available_bytes(root) == GIB - GIB // 4


def test_v1_limit_with_a_path_that_is_not_below_the_mount(tmp_path):
    """Docker on cgroup v1 mounts only its group: the path /proc/self/cgroup names (/docker/<id>) is not there."""
    root = _fake(tmp_path, "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n", {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{3 * GIB // 2}\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{GIB}\n",
        "sys/fs/cgroup/memory/memory.stat": f"cache 5\ninactive_file 7\ntotal_inactive_file {GIB // 2}\n",
    })
    assert cgroup_available_bytes(root) == 3 * GIB // 2 - GIB // 2


def test_v1_unlimited_sentinel_and_a_limited_group_below_it(tmp_path):
    membership = "4:memory:/process_api/abc\n0::/\n"
    files = {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{20 * GIB}\n",
        "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": "9223372036854771712\n",
        "sys/fs/cgroup/memory/process_api/abc/memory.usage_in_bytes": f"{GIB}\n",
    }
    assert cgroup_available_bytes(_fake(tmp_path / "free", membership, files)) is None
    files["sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes"] = f"{4 * GIB}\n"
    assert cgroup_available_bytes(_fake(tmp_path / "limited", membership, files)) == 3 * GIB


def test_usage_above_the_limit_leaves_nothing_and_no_cgroup_file_means_no_limit(tmp_path):
    root = _fake(tmp_path / "over", "0::/a\n", {"sys/fs/cgroup/a/memory.max": "100\n", "sys/fs/cgroup/a/memory.current": "150\n"})
    assert cgroup_available_bytes(root) == 0
    assert cgroup_available_bytes(tmp_path / "nothing") is None  # no /proc/self/cgroup (not Linux)


def test_available_bytes_takes_the_smaller_of_host_and_cgroup(monkeypatch):
    host = psutil.virtual_memory().available
    monkeypatch.setattr(io_open, "cgroup_available_bytes", lambda: 12345)
    assert io_open.available_bytes("cpu") == 12345
    monkeypatch.setattr(io_open, "cgroup_available_bytes", lambda: None)
    assert io_open.available_bytes("cpu") == pytest.approx(host, rel=0.5)


def test_auto_streams_when_the_cgroup_leaves_less_than_the_model_needs(tmp_path, monkeypatch):
    """The host has room for the tiny model, the (monkeypatched) container limit does not: auto streams."""
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    size = Checkpoint(checkpoint).total_bytes()
    calib = write_calibration(tmp_path / "calib.jsonl")
    assert not io_open.should_stream(checkpoint, "auto", "cpu"), "without a limit the tiny model is loaded whole"
    monkeypatch.setattr(io_open, "cgroup_available_bytes", lambda: size // 2)
    assert io_open.should_stream(checkpoint, "auto", "cpu")
    result = compress(checkpoint, ratio=0.25, calib=CalibrationSpec(str(calib), samples=4, seq_len=32), out=tmp_path / "out", cache_dir=False)
    assert result.summary["streamed"] is True and result.model is None
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_auto_streams_unless_a_whole_load_fits_with_its_peak(tmp_path, monkeypatch):
    """A whole load peaks at about 2.5 checkpoints: twice the checkpoint free is not enough (the old rule,
    half the free memory, loaded it whole), three times is."""
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    size = Checkpoint(checkpoint).total_bytes()
    monkeypatch.setattr(io_open, "available_bytes", lambda device: 2 * size)
    assert io_open.should_stream(checkpoint, "auto", "cpu")
    monkeypatch.setattr(io_open, "available_bytes", lambda device: 3 * size)
    assert not io_open.should_stream(checkpoint, "auto", "cpu")
