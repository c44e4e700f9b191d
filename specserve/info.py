"""`specserve info`: this machine, the libraries' view of it, the backends measured here and the pick.

Like `vllm collect-env` and `llama-bench`: what a bug report or a benchmark needs to say where it ran. The
bench JSON records the same dict (`collect`).
"""

from __future__ import annotations

import collections
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from specserve import hardware
from specserve.backends.choose import Choice, Measured, measure_in_child

_ONEDNN_PROBE = (
    "import torch; torch._C._nn.mkldnn_linear(torch.randn(4, 64).to_mkldnn(), torch.randn(64, 64).to_mkldnn())"
)


def _onednn_isa() -> str:
    """oneDNN's own report of the ISA it dispatches to (ONEDNN_VERBOSE on a tiny matmul, in a child)."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE], capture_output=True, text=True, env=env)
    found = re.search(r"cpu,isa:(.+)", done.stdout)
    return found[1].strip() if found else "unknown"


def collect(choice: Choice | None = None) -> dict:
    import llama_cpp
    import torch

    from specserve import kernels

    config = torch.__config__.show()
    onednn = re.search(r"MKL-DNN (v[\d.]+)", config)
    return {
        "cpu": {
            "model": hardware.cpu_model(),
            "family_model": hardware.cpu_family_model(),
            "machine": platform.machine(),
            "cores": os.cpu_count(),
            "isa": hardware.isa(),
        },
        "torch": {
            "version": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn": f"{onednn[1] if onednn else '?'} ({_onednn_isa()})",
            "quantized_engines": list(torch.backends.quantized.supported_engines),
            "threads": torch.get_num_threads(),
        },
        "llama.cpp": {
            "llama-cpp-python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(" |"),
            "build": " ".join(hardware.llama_cmake_args()) or "native",
        },
        "specserve_kernels": {"isa": kernels.ops().isa(), "tile_width": kernels.ops().tile_width()},
        "choice": choice.to_json() if choice else None,
    }


def model_summary(path: Path) -> dict:
    """A GGUF file as the backends see it: its architecture, the weight types of each kind of tensor (a
    Q4_K_M file mixes several), and what torch-q4 does with it (runs it as it is, or the types its kernels
    lack, or why it cannot run it)."""
    import gguf

    from specserve.backends.decoder import read_config
    from specserve.backends.torch_q4 import HEAD_AND_BODY, types_lacking_kernels
    from specserve.models.fetch import ModelError

    reader = gguf.GGUFReader(str(path))
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for tensor in reader.tensors:
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else tensor.name.removesuffix(".weight")
        kinds[kind][tensor.tensor_type.name] += 1
    try:
        read_config(reader, "torch-q4")
        lacking = types_lacking_kernels(reader)
        torch_q4 = (
            f"lacks kernels for its {', '.join(lacking)} weights: runs its {HEAD_AND_BODY} requantization "
            "(another model) only if asked (--requantize)"
            if lacking
            else "runs it as it is"
        )
    except ModelError as exc:
        torch_q4 = str(exc)
    return {
        "file": path.name,
        "architecture": reader.fields["general.architecture"].contents(),
        "weights": {kind: dict(types) for kind, types in kinds.items()},
        "torch-q4": torch_q4,
    }


def _model_table(role: str, summary: dict) -> Table:
    table = Table(title=f"{role} {summary['file']}: {summary['architecture']}; torch-q4 {summary['torch-q4']}")
    table.add_column("tensors")
    table.add_column("weight types (count)")
    for kind, types in summary["weights"].items():
        table.add_row(kind, ", ".join(f"{name} ({count})" for name, count in types.items()))
    return table


def _cost_table(title: str, measured: list[Measured], scores: dict[str, float], picked: Measured | None) -> Table:
    sizes = sorted({n for m in measured for n in m.seconds if n > 1})
    targets = bool(scores)
    table = Table(title=title)
    table.add_column("backend / model")
    table.add_column("1 row ms", justify="right")
    for n in sizes:
        table.add_column(str(n), justify="right")
    if targets:
        table.add_column("exact up to", justify="right")
        table.add_column("mean ms/token", justify="right")
    for m in measured:
        name = ("* " if m is picked else "  ") + m.label
        if not m.usable:
            table.add_row(name, f"[red]{m.error}[/red]")
            continue
        one = m.seconds[1]
        row = [f"{1000 * one:.1f}", *(f"{m.seconds[n] / one:.2f}" if n in m.seconds else "" for n in sizes)]
        if targets:
            row += [str(m.exact_windows()), f"{scores[m.label]:.1f}" if m.label in scores else ""]
        table.add_row(name, *row)
    return table


def print_info(info: dict, choice: Choice | None, console: Console) -> None:
    cpu, torch_info, llama, ours = info["cpu"], info["torch"], info["llama.cpp"], info["specserve_kernels"]
    console.print(f"CPU: {cpu['model']} ({cpu['machine']}, {cpu['cores']} cores): {' '.join(cpu['isa'])}")
    console.print(
        f"torch {torch_info['version']}: CPU capability {torch_info['cpu_capability']}, oneDNN {torch_info['onednn']},"
        f" int8 engines {', '.join(torch_info['quantized_engines'])}"
    )
    console.print(f"llama-cpp-python {llama['llama-cpp-python']} (build: {llama['build']}): {llama['system_info']}")
    console.print(f"specserve kernels: {ours['isa']}, tiles of {ours['tile_width']} columns")
    for role, summary in info.get("models", {}).items():
        console.print(_model_table(role, summary))
    if choice is None:
        return
    cached = " (cached measurements)" if choice.cached else ""
    console.print(
        _cost_table(f"Targets: cost of n rows relative to 1{cached}", choice.targets, choice.scores, choice.target)
    )
    if choice.drafts:
        console.print(_cost_table("Drafts: cost of n rows relative to 1", choice.drafts, {}, choice.draft))
    console.print(f"auto picked: {choice.reason}")
    for role, picked in (("target", choice.target), ("draft", choice.draft)):
        if picked is not None:
            console.print(f"the {role} runs {picked.weights}")


def check_backends(model: Path, backends: tuple[str, ...], console: Console) -> int:
    """A real one-token eval of each backend, each in a process of its own: a kernel that crashes on this
    CPU shows as a one-line failure naming it. Returns the number of failures."""
    failures = 0
    for backend in backends:
        result = measure_in_child(backend, model, (1,), exact=False)
        if result.usable:
            ms = 1000 * result.seconds[1]
            console.print(f"[green]ok[/green]   {backend}: one token of {model.name} in {ms:.0f} ms")
        else:
            failures += 1
            console.print(f"[red]FAIL[/red] {backend}: {result.error}")
    return failures
