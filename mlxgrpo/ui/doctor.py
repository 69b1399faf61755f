"""The `mlxgrpo doctor` table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from mlxgrpo.ui import console
from mlxgrpo.ui.console import escape
from mlxgrpo.ui.training import memory_line


def doctor_report(report: dict[str, Any]) -> None:
    """`mlxgrpo doctor` table; the BLAS row turns red with the fix when it is the slow one."""
    device = report["device"]
    backend = device["default_device"]
    if device["backend"] != backend:
        backend += f" ({device['backend']})"
    if device.get("device_name"):
        backend += f", {device['device_name']}"
    gflops = report.get("matmul_fp32_1024_gflops")
    memory = f"RAM {_gib(device.get('system_ram_bytes'))}, {device.get('cpu_count')} CPUs"
    if device.get("device_memory_bytes"):
        memory += f"; device {_gib(device['device_memory_bytes'])}"
    if device.get("max_recommended_working_set_bytes"):
        memory += f" (recommended working set {_gib(device['max_recommended_working_set_bytes'])})"
    rows = [
        ("mlxgrpo", escape(report["mlxgrpo_version"])),
        ("Python", escape(report["python"])),
        ("platform", escape(report["platform"])),
        ("MLX", escape(str(report["mlx_version"]))),
        ("device", escape(backend)),
        ("default dtype", escape(report["default_dtype"])),
        ("BLAS", _blas_cell(report["blas"])),
        ("fp32 1024² matmul", "not measured" if gflops is None else f"{gflops:.1f} GFLOP/s"),
        ("memory", escape(memory)),
    ]
    rows += [
        (escape(name), escape(version or "not installed"))
        for name, version in report["packages"].items()
    ]
    if "memory_paths" in report:
        rows += [
            ("model", escape(report["model"])),
            ("memory paths", memory_line(report["memory_paths"])),
        ]
    table = Table(title="mlxgrpo doctor", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    console.out.print(table)


def _blas_cell(blas: dict[str, Any]) -> str:
    """The BLAS library (markup): red with its hint when slow, its warning in yellow."""
    cell = escape(blas["name"] + (f" — {blas['path']}" if blas.get("path") else ""))
    if not blas["fast"]:
        cell = f"[red]{cell}[/]"
        if blas.get("hint"):
            cell += f"\n[red]{escape(blas['hint'])}[/]"
    if blas.get("warning"):
        cell += f"\n[yellow]{escape(blas['warning'])}[/]"
    return cell


def _gib(n_bytes: int | None) -> str:
    return "unknown" if not n_bytes else f"{n_bytes / 2**30:.1f} GiB"
