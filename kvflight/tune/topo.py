"""GPU topology advisor: reads how the GPUs are linked (NVML, or the text of `nvidia-smi topo -m` / `topo -p2p r`)
and decides, per GPU group and for the whole set, whether a custom (one-shot, peer-to-peer) all-reduce pays.

The rule, from the TensorRT-LLM tuning guide (section 0x04, use_custom_all_reduce) and the `topo -m` legend:

====================  =====================================================================  =======
link between 2 GPUs   what it is                                                             pays?
====================  =====================================================================  =======
NV#                   a bonded set of # NVLinks (directly or through NVSwitch)               yes
PIX, PXB              PCIe P2P through one / several PCIe switches, no host bridge           yes
PHB, NODE             PCIe P2P through the CPU's host bridge(s), inside one NUMA node        yes
SYS (old name SOC)    PCIe plus the socket interconnect (QPI/UPI): crosses NUMA nodes        no
P2P not OK            `topo -p2p r` / NVML says peer access is not supported (CNS, GNS, ...) no
====================  =====================================================================  =======

The guide: "NVLink: custom all-reduce helps both TTFT and TPOT; P2P without crossing NUMA: also recommended, it
may help; P2P across NUMA (e.g. GPUs 0-3 on one node, 4-7 on the other): not recommended; no P2P at all: it must be
off". PIX/PXB/PHB/NODE all stay inside one NUMA node (the legend; the guide: "PHB, PXB and PIX ... generally do not
cross NUMA"), so all four count as "P2P within one NUMA node". `topo -m` alone does not say whether P2P works
(consumer GPUs often refuse it even on PHB): give the `topo -p2p r` matrix too, or let NVML ask the driver; without
it P2P is assumed on PCIe links. A group pays when every pair in it pays (the all-reduce is as slow as its weakest
link); the reason names that link.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Sequence

PCIE_SAME_NUMA: tuple[str, ...] = ("PIX", "PXB", "PHB", "NODE")
CROSS_NUMA: tuple[str, ...] = ("SYS", "SOC")
P2P_STATUS: dict[str, str] = {"OK": "status OK", "CNS": "chipset not supported", "GNS": "GPU not supported",
                              "TNS": "topology not supported", "NS": "not supported", "DR": "disabled by regkey",
                              "U": "unknown"}
_LINK_WORDS: dict[str, str] = {"PIX": "PCIe P2P through at most one PCIe switch",
                               "PXB": "PCIe P2P through several PCIe switches (no host bridge)",
                               "PHB": "PCIe P2P through the CPU's PCIe host bridge (same NUMA node)",
                               "NODE": "PCIe P2P between host bridges of one NUMA node"}
_DEVICE = re.compile(r"^[A-Za-z]+\d+$")
_NV = re.compile(r"^NV(\d+)$")
_AFFINITY_COLUMNS: tuple[str, ...] = ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID")


class TopologyError(RuntimeError):
    """The topology cannot be read or parsed; the message says what to install or pass instead."""


@dataclass
class GpuTopology:
    """How the GPUs are linked: link type per pair (as `topo -m` spells it), NUMA node per GPU, P2P status."""

    gpus: list[int]
    links: dict[tuple[int, int], str]  # (i, j) with i < j -> "NV18", "PIX", "PXB", "PHB", "NODE", "SYS"
    numa_node: dict[int, int | None] = field(default_factory=dict)
    cpu_affinity: dict[int, str] = field(default_factory=dict)
    p2p: dict[tuple[int, int], str] | None = None  # (i, j) i < j -> "OK" / "NS" / ...; None = not known
    source: str = ""

    def link(self, a: int, b: int) -> str:
        key = (min(a, b), max(a, b))
        if key not in self.links:
            raise TopologyError(f"no link known between GPU{a} and GPU{b}; known GPUs: {self.gpus}")
        return self.links[key]

    def p2p_status(self, a: int, b: int) -> str | None:
        if self.p2p is None:
            return None
        return self.p2p.get((min(a, b), max(a, b)))


@dataclass(frozen=True)
class GroupVerdict:
    """Whether a custom all-reduce pays over one set of GPUs, and why."""

    name: str  # "all GPUs", "NUMA node 0", "NVLink island GPU0-3"
    gpus: tuple[int, ...]
    pays: bool
    reason: str


# ---- the rule --------------------------------------------------------------------------------------------------------
def pair_pays(link: str, p2p_status: str | None = None) -> tuple[bool, str]:
    """(pays, reason) for one pair of GPUs linked by `link` (topo -m spelling) with P2P status (None = unknown)."""
    if p2p_status is not None and p2p_status != "OK":
        return False, f"no P2P ({p2p_status}: {P2P_STATUS.get(p2p_status, 'unknown status')}): NCCL only"
    nv = _NV.match(link)
    if nv:
        return True, f"NVLink ({link}: {nv.group(1)} bonded links)"
    if link in PCIE_SAME_NUMA:
        assumed = "" if p2p_status == "OK" else ", P2P assumed (no P2P matrix given)"
        return True, f"{_LINK_WORDS[link]} ({link}){assumed}"
    if link in CROSS_NUMA:
        return False, (f"crosses NUMA nodes ({link}: PCIe + the socket interconnect, QPI/UPI): slower than NCCL's "
                       "ring")
    return False, f"unknown link type {link!r}: custom all-reduce off"


def _link_rank(link: str) -> int:
    """Lower is better: NVLink (more links better), PIX, PXB, PHB, NODE."""
    nv = _NV.match(link)
    if nv:
        return -int(nv.group(1))
    return 1000 + PCIE_SAME_NUMA.index(link) if link in PCIE_SAME_NUMA else 10_000


def group_verdict(topo: GpuTopology, gpus: Sequence[int], name: str = "") -> GroupVerdict:
    """A custom all-reduce over `gpus` pays iff every pair pays; the reason names the weakest or the failing pair."""
    ids = tuple(sorted(set(gpus)))
    name = name or "GPUs " + ",".join(str(g) for g in ids)
    if len(ids) < 2:
        return GroupVerdict(name, ids, False, "a single GPU needs no all-reduce")
    unknown = [g for g in ids if g not in topo.gpus]
    if unknown:
        raise TopologyError(f"GPU{unknown[0]} is not in the topology (GPUs {topo.gpus}); pass ids from that list")
    worst: tuple[int, str, int, int] | None = None
    for a, b in combinations(ids, 2):
        link = topo.link(a, b)
        pays, reason = pair_pays(link, topo.p2p_status(a, b))
        if not pays:
            return GroupVerdict(name, ids, False, f"GPU{a}-GPU{b}: {reason}")
        if worst is None or _link_rank(link) > worst[0]:
            worst = (_link_rank(link), link, a, b)
    assert worst is not None
    _, link, a, b = worst
    _, reason = pair_pays(link, topo.p2p_status(a, b))
    if _NV.match(link):
        return GroupVerdict(name, ids, True, f"every pair is linked by NVLink (weakest {link}, GPU{a}-GPU{b})")
    return GroupVerdict(name, ids, True, f"P2P inside one NUMA node; weakest link GPU{a}-GPU{b}: {reason}")


def gpu_groups(topo: GpuTopology) -> list[tuple[str, tuple[int, ...]]]:
    """The groups worth a verdict: every GPU, each NUMA node, each NVLink island (no duplicates, >= 2 GPUs)."""
    groups: list[tuple[str, tuple[int, ...]]] = [("all GPUs", tuple(topo.gpus))]
    by_node: dict[int, list[int]] = {}
    for g in topo.gpus:
        node = topo.numa_node.get(g)
        if node is not None:
            by_node.setdefault(node, []).append(g)
    groups += [(f"NUMA node {node}", tuple(ids)) for node, ids in sorted(by_node.items())]
    if not by_node:  # no NUMA column: group by PCIe locality (components of non-SYS links)
        groups += [(f"PCIe domain of GPU{c[0]}", c) for c in _components(topo, lambda l: l not in CROSS_NUMA)]
    groups += [(f"NVLink island of GPU{c[0]}", c) for c in _components(topo, lambda l: bool(_NV.match(l)))]
    seen: set[tuple[int, ...]] = set()
    out = []
    for name, ids in groups:
        if len(ids) >= 2 and ids not in seen:
            seen.add(ids)
            out.append((name, ids))
    return out


def _components(topo: GpuTopology, joined: object) -> list[tuple[int, ...]]:
    parent = {g: g for g in topo.gpus}

    def find(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    for (a, b), link in topo.links.items():
        if joined(link):  # type: ignore[operator]
            parent[find(a)] = find(b)
    comps: dict[int, list[int]] = {}
    for g in topo.gpus:
        comps.setdefault(find(g), []).append(g)
    return [tuple(c) for c in comps.values()]


def advise(topo: GpuTopology) -> list[GroupVerdict]:
    return [group_verdict(topo, ids, name) for name, ids in gpu_groups(topo)]


def physical_gpu_ids(num_ranks: int, visible: str | None = None) -> list[int]:
    """The topology's GPU indices of CUDA devices 0..num_ranks-1: CUDA_VISIBLE_DEVICES (or `visible`) renumbers them
    (e.g. "4,5" puts rank 0 on GPU4). UUIDs / MIG names cannot be mapped without the driver: logical ids then."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible:
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if all(p.isdigit() for p in parts) and len(parts) >= num_ranks:
            return [int(p) for p in parts[:num_ranks]]
    return list(range(num_ranks))


def custom_allreduce_pays(gpu_ids: Sequence[int], topology: GpuTopology | None = None) -> tuple[bool, str]:
    """(pays, reason) for a tensor-parallel group on `gpu_ids`; reads this machine's topology when none is given.
    A topology that cannot be read means no (NCCL's all-reduce is always correct)."""
    if len(set(gpu_ids)) < 2:
        return False, "a single GPU needs no all-reduce"
    if topology is None:
        try:
            topology = read_topology()
        except TopologyError as exc:
            return False, f"topology unknown ({exc}); custom all-reduce off, NCCL all-reduce used"
    verdict = group_verdict(topology, gpu_ids)
    return verdict.pays, verdict.reason


# ---- parsing `nvidia-smi topo -m` and `nvidia-smi topo -p2p r` -------------------------------------------------------
@dataclass
class _Matrix:
    devices: list[str]  # column device names in order (GPU0 .. NIC0 ..)
    rows: dict[str, list[str]]  # row device -> cells in column order
    extras: dict[str, list[str]]  # row device -> the cells after the device columns (affinities)


def _split_matrices(text: str) -> list[_Matrix]:
    """Every matrix in the text: a header line naming GPU0 .., then one row per device, until a blank line or the
    legend. Cells are whitespace-separated (tabs or the spaces a copy-paste leaves)."""
    matrices: list[_Matrix] = []
    current: _Matrix | None = None
    for raw in text.splitlines():
        tokens = raw.split()
        if not tokens or tokens[0].startswith("Legend"):
            current = None
            continue
        devices = _header_devices(tokens)
        if devices is not None:
            current = _Matrix(devices, {}, {})
            matrices.append(current)
        elif current is not None and _DEVICE.match(tokens[0]) and len(tokens) > len(current.devices):
            n = len(current.devices)
            current.rows[tokens[0]] = tokens[1:1 + n]
            current.extras[tokens[0]] = tokens[1 + n:]
    return [m for m in matrices if m.rows]


def _header_devices(tokens: list[str]) -> list[str] | None:
    """The column devices when the line is a matrix header ("GPU0 GPU1 ... CPU Affinity NUMA Affinity ..."; a
    command prompt before GPU0 is ignored), else None."""
    if "GPU0" not in tokens:
        return None
    rest = tokens[tokens.index("GPU0"):]
    words = {w for col in _AFFINITY_COLUMNS for w in col.split()}
    if all(_DEVICE.match(t) or t in words for t in rest):
        return [t for t in rest if _DEVICE.match(t)]
    return None


def _gpu_index(name: str) -> int | None:
    m = re.match(r"^GPU(\d+)$", name)
    return int(m.group(1)) if m else None


def _is_p2p_matrix(m: _Matrix) -> bool:
    cells = {c for row in m.rows.values() for c in row}
    return bool(cells) and cells <= set(P2P_STATUS) | {"X"}


def parse_topology(text: str, source: str = "text") -> GpuTopology:
    """Parse `nvidia-smi topo -m` output (tabs or collapsed spaces), optionally followed by `topo -p2p r` output."""
    matrices = _split_matrices(text)
    link_m = next((m for m in matrices if not _is_p2p_matrix(m)), None)
    p2p_m = next((m for m in matrices if _is_p2p_matrix(m)), None)
    base = link_m or p2p_m
    if base is None:
        raise TopologyError(f"{source}: no GPU matrix found; expected the output of `nvidia-smi topo -m` (a header "
                            "line GPU0 GPU1 ... and one row per GPU)")
    gpus = sorted(g for g in (_gpu_index(r) for r in base.rows) if g is not None)
    links: dict[tuple[int, int], str] = {}
    numa: dict[int, int | None] = {}
    cpus: dict[int, str] = {}
    if link_m is not None:
        links = _pairs(link_m, gpus, source)
        for g in gpus:
            cpus[g], numa[g] = _affinity(link_m.extras.get(f"GPU{g}", []))
    p2p = _pairs(p2p_m, gpus, source) if p2p_m is not None else None
    if link_m is None:  # only a P2P matrix: the link type is unknown, call it PHB (P2P decides)
        links = {k: "PHB" for k in (p2p or {})}
    return GpuTopology(gpus, links, numa, cpus, p2p, source)


def _pairs(m: _Matrix, gpus: list[int], source: str) -> dict[tuple[int, int], str]:
    cols = {name: i for i, name in enumerate(m.devices)}
    out: dict[tuple[int, int], str] = {}
    for a, b in combinations(gpus, 2):
        row, col = m.rows.get(f"GPU{a}"), cols.get(f"GPU{b}")
        if row is None or col is None or col >= len(row):
            raise TopologyError(f"{source}: the matrix has no cell for GPU{a}-GPU{b}; is the text complete?")
        out[(a, b)] = row[col]
    return out


def _affinity(extras: list[str]) -> tuple[str, int | None]:
    """(CPU affinity, NUMA node) from the cells after the device columns ('0-13,28-41', '0', 'N/A')."""
    cpu = extras[0] if extras else ""
    node: int | None = None
    if len(extras) > 1 and extras[1].isdigit():
        node = int(extras[1])
    return cpu, node


# ---- reading this machine --------------------------------------------------------------------------------------------
_NVML_LEVELS: dict[int, str] = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
_NVML_P2P: dict[int, str] = {0: "OK", 1: "CNS", 2: "GNS", 3: "TNS", 4: "DR", 5: "NS", 6: "U"}


def topology_from_nvml() -> GpuTopology:
    """This machine's topology through NVML (the nvidia-ml-py package, imported as pynvml)."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        raise TopologyError("NVML is not available: the nvidia-ml-py package is not installed "
                            "(pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError: no driver / no GPU
        raise TopologyError(f"NVML cannot start ({exc}); is the NVIDIA driver loaded?") from None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        gpus = list(range(len(handles)))
        links, p2p = {}, {}
        nvlinks = [_nvml_nvlink_peers(pynvml, h) for h in handles]
        bus_ids = [_nvml_bus_id(pynvml, h) for h in handles]
        for a, b in combinations(gpus, 2):
            links[(a, b)] = _nvml_link(pynvml, handles, nvlinks, bus_ids, a, b)
            try:
                status = pynvml.nvmlDeviceGetP2PStatus(handles[a], handles[b], pynvml.NVML_P2P_CAPS_INDEX_READ)
                p2p[(a, b)] = _NVML_P2P.get(int(status), "U")
            except Exception:  # noqa: BLE001 - an old driver without the call: unknown
                pass
        numa = {g: _nvml_numa(pynvml, h) for g, h in zip(gpus, handles)}
        return GpuTopology(gpus, links, numa, {}, p2p or None, "NVML")
    finally:
        pynvml.nvmlShutdown()


def _nvml_bus_id(pynvml: object, handle: object) -> str:
    bus = pynvml.nvmlDeviceGetPciInfo(handle).busId  # type: ignore[attr-defined]
    return (bus.decode() if isinstance(bus, bytes) else str(bus)).lower()


def _nvml_nvlink_peers(pynvml: object, handle: object) -> list[str]:
    """The PCI bus ids at the far end of each active NVLink (a GPU, or an NVSwitch)."""
    peers = []
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handle, link):  # type: ignore[attr-defined]
                bus = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId  # type: ignore[attr-defined]
                peers.append((bus.decode() if isinstance(bus, bytes) else str(bus)).lower())
        except Exception:  # noqa: BLE001 - link not present
            continue
    return peers


def _nvml_link(pynvml: object, handles: list, nvlinks: list[list[str]], bus_ids: list[str], a: int, b: int) -> str:
    direct = sum(1 for peer in nvlinks[a] if peer == bus_ids[b])
    if direct:
        return f"NV{direct}"
    switch_a = [p for p in nvlinks[a] if p not in bus_ids]
    switch_b = [p for p in nvlinks[b] if p not in bus_ids]
    if switch_a and switch_b:  # both reach NVSwitches: all-to-all over NVLink
        return f"NV{min(len(switch_a), len(switch_b))}"
    try:
        level = pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])  # type: ignore[attr-defined]
        return _NVML_LEVELS.get(int(level), "SYS")
    except Exception:  # noqa: BLE001
        return "SYS"


def _nvml_numa(pynvml: object, handle: object) -> int | None:
    try:
        node = int(pynvml.nvmlDeviceGetNumaNodeId(handle))  # type: ignore[attr-defined]
        return node if node >= 0 else None
    except Exception:  # noqa: BLE001 - older drivers
        return None


def topology_from_nvidia_smi() -> GpuTopology:
    """This machine's topology from `nvidia-smi topo -m` (plus `topo -p2p r` when the driver has it)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise TopologyError("nvidia-smi is not on PATH")
    text = _run([exe, "topo", "-m"])
    try:
        text += "\n\n" + _run([exe, "topo", "-p2p", "r"])
    except TopologyError:
        pass
    return parse_topology(text, "nvidia-smi topo -m")


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TopologyError(f"`{' '.join(cmd)}` failed: {exc}") from None
    if res.returncode != 0:
        raise TopologyError(f"`{' '.join(cmd)}` exited {res.returncode}: {res.stderr.strip()[:300]}")
    return res.stdout


def read_topology() -> GpuTopology:
    """NVML first, else `nvidia-smi topo -m`; TopologyError naming both failures when neither works."""
    try:
        return topology_from_nvml()
    except TopologyError as nvml_error:
        try:
            return topology_from_nvidia_smi()
        except TopologyError as smi_error:
            raise TopologyError(f"{nvml_error}; and {smi_error}. Pass the text of `nvidia-smi topo -m` with "
                                "--file FILE (or - for stdin)") from None


# ---- output and CLI --------------------------------------------------------------------------------------------------
def format_advice(topo: GpuTopology, verdicts: Iterable[GroupVerdict]) -> str:
    lines = [f"GPU topology ({topo.source}): {len(topo.gpus)} GPUs"]
    nodes = {g: topo.numa_node.get(g) for g in topo.gpus}
    if any(v is not None for v in nodes.values()):
        lines.append("NUMA nodes: " + ", ".join(f"GPU{g}={n if n is not None else '?'}" for g, n in nodes.items()))
    lines.append("P2P status: " + ("from `topo -p2p r` / NVML" if topo.p2p is not None else
                                   "not given: assumed on PCIe links (pass `nvidia-smi topo -p2p r` output too)"))
    lines.append("")
    width = max([len(v.name) for v in verdicts] + [5])  # type: ignore[union-attr]
    for v in verdicts:
        ids = ",".join(str(g) for g in v.gpus)
        lines.append(f"{v.name:<{width}}  GPUs {ids:<15}  custom all-reduce: {'yes' if v.pays else 'no ':<3}  "
                     f"{v.reason}")
    return "\n".join(lines)


def add_topo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", default=None, metavar="FILE|-",
                        help="the text of `nvidia-smi topo -m` (optionally followed by `nvidia-smi topo -p2p r`); "
                             "- reads stdin; default: this machine through NVML, else nvidia-smi")
    parser.add_argument("--gpus", default=None, metavar="0,1,..",
                        help="also judge this tensor-parallel group")
    parser.add_argument("--json", action="store_true", help="print the verdicts as JSON")


def run_topo(args: argparse.Namespace) -> int:
    try:
        if args.file == "-":
            topo = parse_topology(sys.stdin.read(), "stdin")
        elif args.file:
            try:
                with open(args.file, encoding="utf-8") as fh:
                    topo = parse_topology(fh.read(), args.file)
            except OSError as exc:
                raise TopologyError(f"--file {args.file}: {exc.strerror or exc}") from None
        else:
            topo = read_topology()
        verdicts = advise(topo)
        if args.gpus:
            ids = [int(x) for x in args.gpus.split(",") if x.strip()]
            verdicts.append(group_verdict(topo, ids, "requested"))
    except (TopologyError, ValueError) as exc:
        print(f"kvflight topo: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"source": topo.source, "gpus": topo.gpus,
                          "groups": [{"name": v.name, "gpus": list(v.gpus), "custom_all_reduce": v.pays,
                                      "reason": v.reason} for v in verdicts]}, indent=2))
    else:
        print(format_advice(topo, verdicts))
    return 0
