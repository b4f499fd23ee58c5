"""Topology advisor: the `nvidia-smi topo -m` matrices printed in the TensorRT-LLM tuning guide (PCIe/NUMA with
PIX/PHB/SYS, NVLink NV18 on an H20 box) and a box whose GPUs refuse P2P, each with its custom all-reduce verdict."""

import json

import pytest

from kvflight.server.cli import main
from kvflight.tune.topo import (
    GpuTopology,
    TopologyError,
    advise,
    custom_allreduce_pays,
    group_verdict,
    pair_pays,
    parse_topology,
    read_topology,
)

# the guide, section 0x04: 8 GPUs on PCIe, GPUs 0-3 on NUMA node 0 and 4-7 on node 1 (from a vLLM issue)
PCIE_NUMA_MATRIX = """\
nvidia-smi topo --matrix
GPU Topology:
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    NIC0    CPU Affinity    NUMA Affinity   GPU NUMA ID
GPU0     X      PIX     PHB     PHB     SYS     SYS     SYS     SYS     PHB     0-13,28-41      0               N/A
GPU1    PIX      X      PHB     PHB     SYS     SYS     SYS     SYS     PHB     0-13,28-41      0               N/A
GPU2    PHB     PHB      X      PIX     SYS     SYS     SYS     SYS     PHB     0-13,28-41      0               N/A
GPU3    PHB     PHB     PIX      X      SYS     SYS     SYS     SYS     PHB     0-13,28-41      0               N/A
GPU4    SYS     SYS     SYS     SYS      X      PIX     PHB     PHB     SYS     14-27,42-55     1               N/A
GPU5    SYS     SYS     SYS     SYS     PIX      X      PHB     PHB     SYS     14-27,42-55     1               N/A
GPU6    SYS     SYS     SYS     SYS     PHB     PHB      X      PIX     SYS     14-27,42-55     1               N/A
GPU7    SYS     SYS     SYS     SYS     PHB     PHB     PIX      X      SYS     14-27,42-55     1               N/A
NIC0    PHB     PHB     PHB     PHB     SYS     SYS     SYS     SYS      X

Legend:  X    = Self  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
"""

# the guide, section 0x04: an H20 box, every GPU pair on NV18 (spaces collapsed as the guide prints it)
NVLINK_MATRIX = """\
GPU Topology:
  GPU0 GPU1 GPU2 GPU3 GPU4 GPU5 GPU6 GPU7 NIC0 NIC1 NIC2 NIC3 NIC4 CPU Affinity NUMA Affinity GPU NUMA ID
GPU0 X NV18 NV18 NV18 NV18 NV18 NV18 NV18 NODE NODE NODE SYS SYS 0-47,96-143 0 N/A
GPU1 NV18 X NV18 NV18 NV18 NV18 NV18 NV18 NODE PIX NODE SYS SYS 0-47,96-143 0 N/A
GPU2 NV18 NV18 X NV18 NV18 NV18 NV18 NV18 NODE NODE NODE SYS SYS 0-47,96-143 0 N/A
GPU3 NV18 NV18 NV18 X NV18 NV18 NV18 NV18 NODE NODE PIX SYS SYS 0-47,96-143 0 N/A
GPU4 NV18 NV18 NV18 NV18 X NV18 NV18 NV18 SYS SYS SYS PIX NODE 48-95,144-191 1 N/A
GPU5 NV18 NV18 NV18 NV18 NV18 X NV18 NV18 SYS SYS SYS NODE NODE 48-95,144-191 1 N/A
GPU6 NV18 NV18 NV18 NV18 NV18 NV18 X NV18 SYS SYS SYS NODE PIX 48-95,144-191 1 N/A
GPU7 NV18 NV18 NV18 NV18 NV18 NV18 NV18 X SYS SYS SYS NODE NODE 48-95,144-191 1 N/A
NIC0 NODE NODE NODE NODE SYS SYS SYS SYS X NODE NODE SYS SYS
NIC1 NODE PIX NODE NODE SYS SYS SYS SYS NODE X NODE SYS SYS
NIC2 NODE NODE NODE PIX SYS SYS SYS SYS NODE NODE X SYS SYS
NIC3 SYS SYS SYS SYS PIX NODE NODE NODE SYS SYS SYS X NODE
NIC4 SYS SYS SYS SYS NODE NODE PIX NODE SYS SYS SYS NODE X
"""

# two consumer GPUs behind the host bridge (tab-separated, as nvidia-smi prints it) whose driver refuses P2P:
# `nvidia-smi topo -m` followed by `nvidia-smi topo -p2p r`
NO_P2P_MATRIX = (
    "\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tPHB\t0-31\t0\t\tN/A\n"
    "GPU1\tPHB\t X \t0-31\t0\t\tN/A\n"
    "\n"
    "Legend:\n\n  X    = Self\n  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)\n"
    "\n"
    " \tGPU0\tGPU1\t\n"
    " GPU0\tX\tGNS\t\n"
    " GPU1\tGNS\tX\t\n"
    "\n"
    "Legend:\n\n  X    = Self\n  OK   = Status Ok\n  GNS  = GPU not supported\n  NS   = Not supported\n"
)


def test_parse_pcie_numa_matrix():
    topo = parse_topology(PCIE_NUMA_MATRIX)
    assert topo.gpus == list(range(8))
    assert topo.link(0, 1) == "PIX" and topo.link(0, 2) == "PHB" and topo.link(3, 4) == "SYS"
    assert topo.link(6, 7) == "PIX" and topo.link(5, 6) == "PHB"
    assert [topo.numa_node[g] for g in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert topo.cpu_affinity[4] == "14-27,42-55"
    assert topo.p2p is None  # topo -m alone does not say


def test_pcie_numa_verdicts():
    topo = parse_topology(PCIE_NUMA_MATRIX)
    verdicts = {v.name: v for v in advise(topo)}
    assert set(verdicts) == {"all GPUs", "NUMA node 0", "NUMA node 1"}
    whole = verdicts["all GPUs"]
    assert not whole.pays and "SYS" in whole.reason and "NUMA" in whole.reason
    for node, gpus in (("NUMA node 0", (0, 1, 2, 3)), ("NUMA node 1", (4, 5, 6, 7))):
        v = verdicts[node]
        assert v.gpus == gpus and v.pays
        assert "PHB" in v.reason and "NUMA" in v.reason  # the weakest link inside the node is the host bridge
    assert custom_allreduce_pays([0, 1], topo) == (True, custom_allreduce_pays([1, 0], topo)[1])
    pays, reason = custom_allreduce_pays([0, 1], topo)
    assert pays and "PIX" in reason
    pays, reason = custom_allreduce_pays([2, 5], topo)
    assert not pays and "GPU2-GPU5" in reason and "SYS" in reason


def test_nvlink_matrix_verdicts():
    topo = parse_topology(NVLINK_MATRIX)
    assert topo.gpus == list(range(8))
    assert all(link == "NV18" for link in topo.links.values())
    assert [topo.numa_node[g] for g in range(8)] == [0] * 4 + [1] * 4
    verdicts = advise(topo)
    assert [v.name for v in verdicts] == ["all GPUs", "NUMA node 0", "NUMA node 1"]  # one NVLink island = all
    assert all(v.pays for v in verdicts)
    assert "NVLink" in verdicts[0].reason and "NV18" in verdicts[0].reason
    # NVLink pays even across the two NUMA nodes
    assert custom_allreduce_pays([0, 4], topo)[0] is True


def test_no_p2p_matrix_verdicts():
    topo = parse_topology(NO_P2P_MATRIX)
    assert topo.gpus == [0, 1] and topo.link(0, 1) == "PHB"
    assert topo.p2p == {(0, 1): "GNS"} and topo.numa_node == {0: 0, 1: 0}
    verdicts = advise(topo)
    assert [(v.name, v.pays) for v in verdicts] == [("all GPUs", False)]
    assert "no P2P" in verdicts[0].reason and "GNS" in verdicts[0].reason
    pays, reason = custom_allreduce_pays([0, 1], topo)
    assert not pays and "GPU not supported" in reason
    # the same link with P2P OK pays
    ok = parse_topology(NO_P2P_MATRIX.replace("GNS", "OK"))
    assert custom_allreduce_pays([0, 1], ok)[0] is True


@pytest.mark.parametrize("link, p2p, pays", [
    ("NV4", None, True), ("PIX", None, True), ("PXB", None, True), ("PHB", None, True), ("NODE", None, True),
    ("SYS", None, False), ("SOC", None, False), ("PHB", "NS", False), ("NV18", "CNS", False), ("???", None, False),
])
def test_pair_rule(link, p2p, pays):
    assert pair_pays(link, p2p)[0] is pays


def test_single_gpu_and_unknown_gpu():
    topo = parse_topology(NVLINK_MATRIX)
    assert custom_allreduce_pays([3], topo) == (False, "a single GPU needs no all-reduce")
    with pytest.raises(TopologyError, match="GPU9"):
        group_verdict(topo, [0, 9])
    with pytest.raises(TopologyError, match="nvidia-smi topo -m"):
        parse_topology("nothing here\n")


def test_without_nvml_or_nvidia_smi(monkeypatch):
    """nvidia-ml-py is not installed and nvidia-smi is not on PATH here: a clear error, and 'no' for the engine."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(TopologyError) as info:
        read_topology()
    text = str(info.value)
    assert "nvidia-ml-py" in text and "nvidia-smi" in text and "--file" in text
    pays, reason = custom_allreduce_pays([0, 1])
    assert not pays and "NCCL" in reason


def test_cli_reads_file_and_stdin(tmp_path, capsys, monkeypatch):
    path = tmp_path / "topo.txt"
    path.write_text(PCIE_NUMA_MATRIX)
    assert main(["topo", "--file", str(path), "--gpus", "4,5,6,7"]) == 0
    out = capsys.readouterr().out
    assert "NUMA node 0" in out and "custom all-reduce: yes" in out and "custom all-reduce: no" in out
    assert out.strip().splitlines()[-1].startswith("requested")
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(NVLINK_MATRIX))
    assert main(["topo", "--file", "-", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpus"] == list(range(8)) and all(g["custom_all_reduce"] for g in doc["groups"])
    assert main(["topo", "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_topology_from_dataclass_directly():
    topo = GpuTopology([0, 1, 2], {(0, 1): "NV2", (0, 2): "NODE", (1, 2): "NODE"}, source="hand")
    names = [name for name, _ in [(v.name, v) for v in advise(topo)]]
    assert "NVLink island of GPU0" in names and "PCIe domain of GPU0" not in names  # same set as all GPUs
    v = group_verdict(topo, [0, 1, 2])
    assert v.pays and "NODE" in v.reason


def test_physical_gpu_ids_follow_cuda_visible_devices():
    from kvflight.tune.topo import physical_gpu_ids

    assert physical_gpu_ids(2, "4,5,6") == [4, 5]  # rank r runs on cuda:r = the r-th visible GPU
    assert physical_gpu_ids(2, "") == [0, 1]
    assert physical_gpu_ids(2, "GPU-8a1b,GPU-77cd") == [0, 1]  # UUIDs: not mappable without the driver
    assert physical_gpu_ids(3, "1,2") == [0, 1, 2]  # fewer visible than ranks: the engine refuses it elsewhere
