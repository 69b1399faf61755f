"""Point libmlx's BLAS/LAPACK imports at a BLAS whose symbols carry a prefix (Linux, ELF64).

The `scipy-openblas32` wheel ships a fast, self-contained OpenBLAS, but every symbol it exports is
renamed (`scipy_cblas_sgemm`, `scipy_sgesdd_`), so loading it with RTLD_GLOBAL binds nothing:
libmlx keeps calling its bundled reference BLAS. libmlx reaches each imported function through
one pointer slot (a GOT entry, filled by a JUMP_SLOT or GLOB_DAT relocation). Once libmlx is
loaded, writing the prefixed function's address into the slot of every BLAS/LAPACK name it
imports makes all its calls go to the wheel; nothing else in the process is touched.

The slots are found from libmlx's file (program headers, dynamic section, relocation and symbol
tables; 64-bit little-endian x86_64 and aarch64 only), and at runtime through the dynamic
linker's load base. It is all or nothing: when any slot cannot be found, reached or verified,
no slot is written and `SlotError` says why, so callers can report the reference BLAS honestly.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mlxgrpo.blas_probe import LinkMap, dl_library, mapped_library, owner_of

WHEEL_PACKAGE = "scipy-openblas32"
WHEEL_PREFIX = "scipy_"

# BLAS/LAPACK names as libmlx imports them: CBLAS (`cblas_sgemm`) or Fortran LAPACK (`sgesdd_`).
_BLAS_NAME = re.compile(r"cblas_[a-z0-9_]+|[sdcz][a-z0-9]{2,7}_")
_RTLD_DI_LINKMAP = 2
_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_PLTRELSZ, _DT_STRTAB, _DT_SYMTAB = 0, 2, 5, 6
_DT_RELA, _DT_RELASZ, _DT_RELAENT, _DT_STRSZ, _DT_SYMENT = 7, 8, 9, 10, 11
_DT_PLTREL, _DT_JMPREL = 20, 23
# e_machine -> (JUMP_SLOT, GLOB_DAT) relocation types: both mean "slot = symbol address".
_SLOT_RELOCATIONS = {62: (7, 6), 183: (1026, 1025)}  # x86_64, aarch64
_PROT = {"r": 1, "w": 2, "x": 4}


class SlotError(Exception):
    """Why the slots were not rebound: one line, meant for `mlxgrpo doctor`."""


@dataclass(frozen=True)
class Rebinding:
    """What a successful `rebind` did."""

    library: str  # the file now serving libmlx's BLAS calls
    libmlx: str
    symbols: tuple[str, ...]


_done: Rebinding | None = None


def current() -> Rebinding | None:
    """The rebinding done in this process, if any."""
    return _done


def wheel_library() -> str | None:
    """Path of the scipy-openblas32 shared library, found without importing the package."""
    try:
        spec = importlib.util.find_spec("scipy_openblas32")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    found = sorted(lib_dir.glob("libscipy_openblas*.so*")) if lib_dir.is_dir() else []
    return str(found[0]) if found else None


def wheel_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(WHEEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- rebinding


def rebind(library: str, prefix: str = WHEEL_PREFIX) -> Rebinding:
    """Point every BLAS/LAPACK slot of the loaded libmlx at `prefix`+name in `library`.

    Raises SlotError (nothing written) when libmlx is not loaded, its slots cannot be found or
    made writable, or `library` lacks `prefix`cblas_sgemm.
    """
    global _done
    mapped = mapped_library("libmlx")
    if mapped is None:
        raise SlotError("libmlx is not loaded in this process (import mlx.core first)")
    libmlx, _ranges = mapped
    try:
        lib = ctypes.CDLL(library, mode=os.RTLD_LOCAL)
    except OSError as exc:
        raise SlotError(f"cannot load {library} ({exc})") from None
    imports, odd = _blas_imports(libmlx)
    targets: dict[str, int] = {}
    for name in imports:
        function = getattr(lib, prefix + name, None)
        if function is not None:
            targets[name] = ctypes.cast(function, ctypes.c_void_p).value
    if "cblas_sgemm" not in targets:
        if "cblas_sgemm" not in imports:
            raise SlotError(f"no relocation for cblas_sgemm found in {libmlx}")
        raise SlotError(f"{library} does not export {prefix}cblas_sgemm")
    if odd & targets.keys():
        names = ", ".join(sorted(odd & targets.keys()))
        raise SlotError(f"{names} in {libmlx} are relocated other than through a plain slot")
    base = _load_base(libmlx)
    slots = {name: [base + offset for offset in imports[name]] for name in targets}
    maps = _writable_map(libmlx)
    pages = _pages_to_unlock({s for addresses in slots.values() for s in addresses}, maps)
    every = [(slot, targets[name]) for name, addresses in slots.items() for slot in addresses]
    before = [ctypes.c_void_p.from_address(slot).value for slot, _ in every]
    _set_protection(pages, writable=True)
    try:
        for slot, address in every:
            ctypes.c_void_p.from_address(slot).value = address
        kept = all(ctypes.c_void_p.from_address(s).value == a for s, a in every)
        if not kept:  # all or nothing: put the bundled BLAS back everywhere
            for (slot, _), old in zip(every, before, strict=True):
                ctypes.c_void_p.from_address(slot).value = old
    finally:
        _set_protection(pages, writable=False)
    if not kept:
        raise SlotError("libmlx's slots did not keep the new addresses; left unchanged")
    owner = owner_of(targets["cblas_sgemm"]) or library
    _done = Rebinding(owner, libmlx, tuple(sorted(targets)))
    return _done


def slot_values(symbols: tuple[str, ...] | None = None) -> dict[str, list[int]]:
    """The addresses libmlx's BLAS/LAPACK slots hold now (for checks and tests)."""
    mapped = mapped_library("libmlx")
    if mapped is None:
        return {}
    libmlx = mapped[0]
    base = _load_base(libmlx)
    imports, _odd = _blas_imports(libmlx)
    names = symbols if symbols is not None else tuple(imports)
    return {
        name: [ctypes.c_void_p.from_address(base + o).value for o in imports.get(name, [])]
        for name in names
    }


def _load_base(path: str) -> int:
    libdl = dl_library()
    if libdl is None:
        raise SlotError("dlinfo is not available (not glibc?)")
    try:
        handle = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)._handle
    except OSError as exc:
        raise SlotError(f"cannot open the loaded {path} ({exc})") from None
    link_map = ctypes.POINTER(LinkMap)()
    if libdl.dlinfo(ctypes.c_void_p(handle), _RTLD_DI_LINKMAP, ctypes.byref(link_map)) != 0:
        raise SlotError(f"dlinfo found no link map for {path}")
    return link_map.contents.l_addr


def _writable_map(path: str) -> list[tuple[int, int, int]]:
    """(start, end, protection) of each mapping of `path` in this process."""
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == path:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            maps.append((start, end, sum(_PROT.get(c, 0) for c in fields[1][:3])))
    return maps


def _pages_to_unlock(slots: set[int], maps: list[tuple[int, int, int]]) -> dict[int, int]:
    """Page -> original protection for the pages holding `slots` that are read-only now."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    pages: dict[int, int] = {}
    for slot in slots:
        mapping = next((m for m in maps if m[0] <= slot and slot + 8 <= m[1]), None)
        if mapping is None:
            raise SlotError(f"slot {slot:#x} lies outside libmlx's mapped memory")
        if not mapping[2] & _PROT["w"]:  # RELRO made it read-only after relocation
            pages[slot - slot % page_size] = mapping[2]
    return pages


def _set_protection(pages: dict[int, int], *, writable: bool) -> None:
    if not pages:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    mprotect = libc.mprotect
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page_size = os.sysconf("SC_PAGE_SIZE")
    for page, protection in pages.items():
        wanted = protection | _PROT["w"] if writable else protection
        if mprotect(ctypes.c_void_p(page), page_size, wanted) != 0:
            raise SlotError(f"mprotect failed on libmlx's GOT: {os.strerror(ctypes.get_errno())}")


# --------------------------------------------------------------------------- ELF


def _blas_imports(path: str) -> tuple[dict[str, list[int]], frozenset[str]]:
    try:
        return _relocations(path)
    except (OSError, struct.error, IndexError, ValueError) as exc:
        raise SlotError(f"cannot read the relocations of {path} ({exc})") from None


@lru_cache(maxsize=2)
def _relocations(path: str) -> tuple[dict[str, list[int]], frozenset[str]]:
    """BLAS/LAPACK name -> slot offsets (from the load base) of its imports in `path`, and the
    names that are also relocated some other way (their calls cannot all be redirected).

    Read through the program headers and the dynamic section, which every loadable ELF keeps
    (section headers may be stripped). Raises SlotError for an ELF this code does not handle.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SlotError(f"{path} is not a 64-bit little-endian ELF file")
    (machine,) = struct.unpack_from("<H", data, 0x12)
    if machine not in _SLOT_RELOCATIONS:
        raise SlotError(f"unsupported ELF machine {machine} in {path}")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    headers = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    loads = [(h[3], h[2], h[5]) for h in headers if h[0] == _PT_LOAD]  # vaddr, offset, filesz

    def at(vaddr: int) -> int:
        for start, offset, size in loads:
            if start <= vaddr < start + size:
                return offset + vaddr - start
        raise SlotError(f"address {vaddr:#x} is not in any loaded segment of {path}")

    dynamic = next((h for h in headers if h[0] == _PT_DYNAMIC), None)
    if dynamic is None:
        raise SlotError(f"{path} has no dynamic section")
    tags: dict[int, int] = {}
    for position in range(dynamic[2], dynamic[2] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, position)
        if tag == _DT_NULL:
            break
        tags.setdefault(tag, value)
    if _DT_SYMTAB not in tags or _DT_STRTAB not in tags:
        raise SlotError(f"{path} has no dynamic symbol table")
    if _DT_JMPREL in tags and tags.get(_DT_PLTREL, _DT_RELA) != _DT_RELA:
        raise SlotError(f"{path} uses REL relocations, expected RELA")
    symtab, strtab = at(tags[_DT_SYMTAB]), at(tags[_DT_STRTAB])
    syment = tags.get(_DT_SYMENT, 24)
    tables = [
        (tags.get(_DT_RELA), tags.get(_DT_RELASZ, 0)),
        (tags.get(_DT_JMPREL), tags.get(_DT_PLTRELSZ, 0)),
    ]
    relaent = tags.get(_DT_RELAENT, 24)
    slot_types = _SLOT_RELOCATIONS[machine]
    found: dict[str, list[int]] = {}
    odd: set[str] = set()
    for start, size in tables:
        if not start:
            continue
        offset = at(start)
        for position in range(offset, offset + size, relaent):
            r_offset, r_info, addend = struct.unpack_from("<QQq", data, position)
            index, kind = r_info >> 32, r_info & 0xFFFFFFFF
            if index == 0:
                continue
            name_offset, _info, _other, shndx = struct.unpack_from(
                "<IBBH", data, symtab + index * syment
            )
            if shndx != 0:  # defined in libmlx itself, not an import
                continue
            end = data.index(b"\x00", strtab + name_offset)
            name = data[strtab + name_offset : end].decode("ascii", "replace")
            if not _BLAS_NAME.fullmatch(name):
                continue
            if kind not in slot_types or addend != 0:
                odd.add(name)  # e.g. an address with an offset: not a slot we can rewrite
            found.setdefault(name, []).append(r_offset)
    return found, frozenset(odd)
