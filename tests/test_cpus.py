"""The CPUs a container may use: cgroup v2 and v1 quotas from fake cgroup trees, the CPU set, the node."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenasr_appliance import cpus
from qwenasr_appliance.config import Settings
from qwenasr_appliance.cpus import cgroup_quota_cpus, cpu_budget, own_cgroup_v2


def v2_tree(root: Path, levels: dict[str, str]) -> Path:
    """A cgroup v2 mount at `root`: `levels` maps a cgroup path ("" = the mount) to its cpu.max."""
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for path, cpu_max in levels.items():
        directory = root / path
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(cpu_max + "\n")
    return root


def v1_tree(root: Path, quota: str, period: str, directory: str = "cpu,cpuacct") -> Path:
    (root / directory).mkdir(parents=True)
    (root / directory / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / directory / "cpu.cfs_period_us").write_text(period + "\n")
    return root


def test_cgroup_v2_quota_of_a_pod_limited_to_16_cpus_on_a_224_thread_node(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, {"": "1600000 100000"})
    assert cgroup_quota_cpus(root, "/") == 16.0
    budget = cpu_budget(root, own="/", affinity=224, node_cpus=224)
    assert (budget.cpus, budget.source, budget.quota_cpus, budget.node_cpus) == (16, "cgroup_quota", 16.0, 224)


def test_cgroup_v2_without_a_quota(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, {"": "max 100000"})
    assert cgroup_quota_cpus(root, "/") is None
    budget = cpu_budget(root, own="/", affinity=224, node_cpus=224)
    assert (budget.cpus, budget.source) == (224, "affinity")


def test_fractional_quota_rounds_up_and_never_below_one(tmp_path: Path) -> None:
    assert cpu_budget(v2_tree(tmp_path / "a", {"": "150000 100000"}), own="/", affinity=8, node_cpus=8).cpus == 2
    tiny = cpu_budget(v2_tree(tmp_path / "b", {"": "10000 100000"}), own="/", affinity=8, node_cpus=8)
    assert (tiny.cpus, tiny.quota_cpus) == (1, 0.1)


def test_cgroup_v2_smallest_quota_from_the_own_cgroup_up(tmp_path: Path) -> None:
    """Without a cgroup namespace the process sits below the mount; an ancestor's limit applies too."""
    pod = "kubepods.slice/kubepods-pod1.slice"
    root = v2_tree(tmp_path, {"kubepods.slice": "400000 100000", pod: "max 100000", f"{pod}/ctr": "800000 100000"})
    assert cgroup_quota_cpus(root, f"/{pod}/ctr") == 4.0
    assert cgroup_quota_cpus(root, f"/{pod}") == 4.0
    assert cgroup_quota_cpus(root, "/") is None  # the mount itself has no cpu.max here
    # A path that climbs out of the mount reads nothing outside it.
    assert cgroup_quota_cpus(root, "/../../etc") is None


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota_cpus(v1_tree(tmp_path / "a", "200000", "100000")) == 2.0
    assert cgroup_quota_cpus(v1_tree(tmp_path / "b", "-1", "100000", directory="cpu")) is None
    budget = cpu_budget(v1_tree(tmp_path / "c", "300000", "100000"), affinity=64, node_cpus=64)
    assert (budget.cpus, budget.source) == (3, "cgroup_quota")


def test_the_cpu_set_wins_when_smaller_than_the_quota(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, {"": "1600000 100000"})
    budget = cpu_budget(root, own="/", affinity=4, node_cpus=224)
    assert (budget.cpus, budget.source, budget.affinity_cpus) == (4, "affinity", 4)


@pytest.mark.parametrize("content", ["", "garbage", "max", "100000", "0 100000", "abc 100000", "100 0"])
def test_malformed_or_missing_files_mean_no_quota(tmp_path: Path, content: str) -> None:
    root = v2_tree(tmp_path, {"": content})
    assert cgroup_quota_cpus(root, "/") is None
    assert cgroup_quota_cpus(tmp_path / "nothing-mounted-here") is None
    assert cpu_budget(root, own="/", affinity=None, node_cpus=None).cpus == 1  # nothing known: 1


def test_own_cgroup_v2_path(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("12:cpu,cpuacct:/x\n0::/kubepods.slice/pod1/ctr\n")
    assert own_cgroup_v2(proc) == "/kubepods.slice/pod1/ctr"
    proc.write_text("0::/\n")
    assert own_cgroup_v2(proc) == "/"
    assert own_cgroup_v2(tmp_path / "missing") == "/"


def test_this_process_has_a_budget() -> None:
    budget = cpus.process_cpu_budget()
    assert 1 <= budget.cpus <= (budget.node_cpus or budget.cpus)
    assert cpus.usable_cpus() == budget.cpus
    assert set(budget.as_log()) == {"cpus", "source", "node_cpus", "affinity_cpus", "quota_cpus"}


def test_decode_workers_zero_means_the_container_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenasr_appliance import config

    monkeypatch.setattr(config, "usable_cpus", lambda: 16)
    assert Settings().effective_decode_workers == 16
    assert Settings(decode_workers=3).effective_decode_workers == 3


def test_vllm_renderer_threads_follow_the_container_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenasr_appliance.engines.vllm import engine

    monkeypatch.setattr(engine, "usable_cpus", lambda: 6)
    assert engine.renderer_workers() == 3
    monkeypatch.setattr(engine, "usable_cpus", lambda: 224)
    assert engine.renderer_workers() == 8
