"""Which library really serves libmlx's `cblas_sgemm` on Linux: read from the process itself.

libmlx calls BLAS through its GOT; reading the slot for `cblas_sgemm` and asking the dynamic
linker (dladdr) who owns the address it holds names the BLAS in use, whatever was preloaded.
When the slot is not bound yet (lazy binding), the symbol lookup libmlx would do is repeated.
Only ctypes and the ELF headers are used, so this works without any extra tool.
"""

from __future__ import annotations

import ctypes
import os
import struct
from functools import lru_cache
from pathlib import Path

UNBOUND = "<unbound>"
_RTLD_DI_LINKMAP = 2
_SHT_RELA, _SHT_DYNSYM = 4, 11


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


class LinkMap(ctypes.Structure):
    _fields_ = [("l_addr", ctypes.c_size_t), ("l_name", ctypes.c_char_p)]


@lru_cache(maxsize=1)
def dl_library() -> ctypes.CDLL | None:
    for name in (None, "libdl.so.2"):  # glibc >= 2.34 has dladdr/dlinfo in libc itself
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if hasattr(lib, "dladdr") and hasattr(lib, "dlinfo"):
            lib.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
            lib.dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            return lib
    return None


def owner_of(address: int | None) -> str | None:
    """The file of the loaded library that contains `address` (dladdr)."""
    libdl = dl_library()
    if not address or libdl is None:
        return None
    info = _DlInfo()
    if not libdl.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode()


def bound_blas_path() -> str | None:
    """Read libmlx's GOT slot for cblas_sgemm: the library its matmuls really call.

    Returns the library's path, `UNBOUND` when the slot still points into libmlx (lazy binding,
    no call yet), or None when this cannot be inspected.
    """
    mapped = mapped_library("libmlx")
    libdl = dl_library()
    if mapped is None or libdl is None:
        return None
    path, ranges = mapped
    slot_offset = _got_slot_offset(path, b"cblas_sgemm")
    if slot_offset is None:
        return None
    try:
        handle = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)._handle
    except OSError:
        return None
    link_map = ctypes.POINTER(LinkMap)()
    if libdl.dlinfo(ctypes.c_void_p(handle), _RTLD_DI_LINKMAP, ctypes.byref(link_map)) != 0:
        return None
    slot = link_map.contents.l_addr + slot_offset
    if not any(start <= slot and slot + 8 <= end for start, end in ranges):
        return None  # never dereference an address outside libmlx's mapped memory
    owner = owner_of(ctypes.c_void_p.from_address(slot).value)
    if owner is None:
        return None
    return UNBOUND if same_file(owner, path) else owner


def predicted_blas_path() -> str | None:
    """Where the dynamic linker would bind cblas_sgemm for libmlx: global scope, then its deps."""
    global_owner = _symbol_owner(None, "cblas_sgemm")
    if global_owner:
        return global_owner
    mapped = mapped_library("libmlx")
    return _symbol_owner(mapped[0], "cblas_sgemm") if mapped else None


def _symbol_owner(library: str | None, symbol: str) -> str | None:
    try:
        lib = ctypes.CDLL(library, mode=os.RTLD_NOLOAD) if library else ctypes.CDLL(None)
        address = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    return owner_of(address)


def mapped_library(prefix: str) -> tuple[str, list[tuple[int, int]]] | None:
    """Path and address ranges of the first mapped file whose name starts with `prefix`."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    found: str | None = None
    ranges: list[tuple[int, int]] = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "r" not in fields[1]:
            continue
        path = fields[5]
        if found is None and os.path.basename(path).startswith(prefix + ".so"):
            found = path
        if path == found:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return (found, ranges) if found else None


@lru_cache(maxsize=4)
def _got_slot_offset(path: str, symbol: bytes) -> int | None:
    """Offset (from the load base) of the relocation slot that `symbol` is bound through.

    Reads the ELF section headers, the dynamic symbol table and its relocations (64-bit
    little-endian only: x86_64 and aarch64, the platforms the mlx[cpu] wheel exists for).
    """
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            (shoff,) = struct.unpack_from("<Q", header, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [
                struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)
            ]

            def read(section: tuple) -> bytes:
                f.seek(section[4])
                return f.read(section[5])

            for rela in sections:
                symtab = sections[rela[6]] if rela[1] == _SHT_RELA else None
                if symtab is None or symtab[1] != _SHT_DYNSYM:
                    continue
                index = _symbol_index(read(symtab), read(sections[symtab[6]]), symbol)
                if index is None:
                    continue
                for r_offset, r_info, _ in struct.iter_unpack("<QQq", read(rela)):
                    if r_info >> 32 == index:
                        return r_offset
    except (OSError, struct.error, IndexError):
        return None
    return None


def _symbol_index(symbols: bytes, strings: bytes, wanted: bytes) -> int | None:
    for index, (name_offset, *_rest) in enumerate(struct.iter_unpack("<IBBHQQ", symbols)):
        end = strings.find(b"\x00", name_offset)
        if strings[name_offset:end] == wanted:
            return index
    return None
