"""GPU and link specifications for the cost model, read from ``data/hardware/``.

* GPUs: ``data/hardware/gpus/<name>.json``. Every figure is ``{"value", "source"}``:
  the vendor's published number and where it was published. A precision the
  tensor cores lack (FP8 on A100) is stored as ``null`` and is absent here.
* Links: ``data/hardware/links.json``, the per-hop latency α of each kind of
  link (an assumption, with its reasoning) and the inter-node networks.
  Bandwidths are one direction, in GB/s; published figures that count both
  directions are halved.

Units: GB = 10^9 bytes, GB/s = 10^9 bytes/s, TFLOP/s = 10^12 FLOP/s.
"""
from __future__ import annotations

from dataclasses import dataclass

from tplab.paths import DATA_DIR
from tplab.specs.reading import read_json, unknown_name

GPU_DIR = DATA_DIR / "hardware" / "gpus"


@dataclass(frozen=True)
class Link:
    """A link between GPUs in the α-β model: one message of S bytes costs α + S/β."""

    name: str
    kind: str  # "nvlink", "pcie" or "network"
    bandwidth_gb_s: float  # β, one direction
    alpha_us: float  # α, per hop
    max_gpus: int | None  # how many GPUs the link joins (None: any number, a network)
    source: str


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's published figures; ``sources`` maps each figure to where it was published."""

    name: str
    label: str
    memory_gb: float
    memory_bandwidth_gb_s: float
    dense_tflops: dict[str, float]  # only precisions the tensor cores support
    interconnects: dict[str, Link]
    datasheet: str
    sources: dict[str, str]
    device_names: tuple[str, ...] = ()  # what torch.cuda.get_device_name() reports for this part

    def tflops(self, dtype: str) -> float | None:
        """Dense tensor-core TFLOP/s for ``dtype`` (bf16/fp16, fp8, int8), None where unsupported."""
        return self.dense_tflops.get("bf16" if dtype == "fp16" else dtype)

    def link(self, interconnect: str | None = None, tp: int = 1) -> Link:
        """The named link: one of this GPU's interconnects, or an inter-node network.

        None picks the fastest of the GPU's links that joins ``tp`` GPUs (an A100
        PCIe pair uses its NVLink bridge, a group of 4 falls back to PCIe).
        """
        if interconnect is None:
            reach = [link for link in self.interconnects.values() if link.max_gpus is None or link.max_gpus >= tp]
            return max(reach or self.interconnects.values(), key=lambda link: link.bandwidth_gb_s)
        if interconnect in self.interconnects:
            return self.interconnects[interconnect]
        networks = _networks()
        if interconnect in networks:
            return networks[interconnect]
        raise unknown_name(f"interconnect for {self.name}", interconnect, [*self.interconnects, *networks])


def _link_latency_us() -> dict[str, float]:
    table = read_json(DATA_DIR / "hardware" / "links.json")["latency_us"]
    return {kind: entry["value"] for kind, entry in table.items()}


def _networks() -> dict[str, Link]:
    data = read_json(DATA_DIR / "hardware" / "links.json")
    alpha = data["latency_us"]["network"]["value"]
    return {name: Link(name, "network", n["bandwidth_gb_s"], alpha, None, n["source"]) for name, n in data["networks"].items()}


def gpu_names() -> list[str]:
    """The shipped GPUs, e.g. ``["a100-pcie-80gb", "a100-sxm-80gb", "h100-pcie", ...]``."""
    return sorted(p.stem for p in GPU_DIR.glob("*.json"))


def network_names() -> list[str]:
    """The shipped inter-node networks, e.g. ``["ib-hdr-200", "ib-ndr-400"]``."""
    return sorted(_networks())


def load_gpu(gpu: str | GpuSpec) -> GpuSpec:
    """The GpuSpec of a shipped GPU name (case-insensitive); an unknown name lists the known ones."""
    if isinstance(gpu, GpuSpec):
        return gpu
    name = str(gpu).lower()
    if name not in gpu_names():
        raise unknown_name("GPU", gpu, gpu_names())
    data = read_json(GPU_DIR / f"{name}.json")
    alpha = _link_latency_us()
    sources = {"memory_gb": data["memory_gb"]["source"], "memory_bandwidth_gb_s": data["memory_bandwidth_gb_s"]["source"]}
    tflops = {}
    for dtype, entry in data["dense_tflops"].items():
        sources[f"tflops_{dtype}"] = entry["source"]
        if entry["value"] is not None:
            tflops[dtype] = float(entry["value"])
    links = {}
    for kind, entry in data["interconnects"].items():
        sources[f"link_{kind}"] = entry["source"]
        links[kind] = Link(kind, kind, float(entry["bandwidth_gb_s"]), alpha[kind], entry["max_gpus"], entry["source"])
    datasheet = f"{data['datasheet']['title']} ({data['datasheet']['url']})"
    sources["device_names"] = data["device_names"]["source"]
    return GpuSpec(name, data["label"], float(data["memory_gb"]["value"]), float(data["memory_bandwidth_gb_s"]["value"]),
                   tflops, links, datasheet, sources, tuple(data["device_names"]["value"]))


def gpu_for_device(device_name: str) -> str | None:
    """The shipped GPU spec whose ``device_names`` include ``device_name`` (as torch reports it), or None."""
    wanted = device_name.strip().lower()
    return next((name for name in gpu_names() if wanted in (n.lower() for n in load_gpu(name).device_names)), None)


