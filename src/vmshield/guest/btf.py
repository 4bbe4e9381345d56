"""A parser of Linux BTF (BPF Type Format) that treats its input as hostile.

Why BTF: a distribution kernel ships no debug symbols, but (with ``CONFIG_DEBUG_INFO_BTF``)
it carries a compact description of every C type it was built from, between the linker
symbols ``__start_BTF`` and ``__stop_BTF`` (the ``.BTF`` section of ``vmlinux``). From it we
learn where ``task_struct.comm`` or ``cred.euid`` lives in *this* build without guessing.

Why hostile: vmshield reads these bytes out of a guest's memory, and the guest may be
compromised. So every count, offset and length is checked against the blob before it is
used, reference chains (typedef -> typedef -> ...) are followed with a cycle check and a
depth limit, string reads are bounded, and nothing is allocated in proportion to a number
the blob merely *claims*: the only sizes we trust are ``len(data)``. Every defect of the
blob is reported as :class:`~vmshield.errors.GuestFormatError` naming the offset or type
id; a name the caller asks for that this kernel does not have is a
:class:`~vmshield.errors.SymbolError`. No other exception escapes, and nothing loops
without bound.

Why lazy: a 6.12 kernel's BTF is ~4.7 MB with ~108k types and we usually need a dozen
structs. :meth:`Btf.parse` checks the header and walks the type section once to record where
each type record starts (which also proves every record fits); a record is decoded only
when asked for, and the name index is built on the first lookup by name.

The format (``include/uapi/linux/btf.h``): a 24-byte header, then a type section of
variable-length records (12 bytes ``name_off, info, size_or_type`` plus kind-specific
trailing data), then a string section of NUL-terminated names. Type id 0 is ``void``;
records are numbered from 1 in order.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from vmshield.errors import GuestFormatError, SymbolError

__all__ = [
    "BTF_MAGIC",
    "Btf",
    "BtfArray",
    "BtfEnumerator",
    "BtfIntEncoding",
    "BtfMember",
    "BtfParam",
    "BtfSecinfo",
    "BtfType",
    "Kind",
    "TypeDesc",
    "parse_btf",
]

BTF_MAGIC = 0xEB9F
"""``btf_header.magic``; on disk ``9f eb`` for little-endian BTF."""

_HEADER = struct.Struct("<HBBIIIII")
_HEADER_SIZE = _HEADER.size  # 24: the version-1 header; hdr_len may be larger.

MAX_CHAIN = 32
"""How many reference hops (typedef, const, array element, ...) we follow before giving up.

Same bound as the kernel's ``MAX_RESOLVE_DEPTH``: a real kernel never needs more, and a
hostile blob cannot make one lookup walk the whole type section.
"""

MAX_NESTING = 32
"""How deep we descend into anonymous struct/union members when looking a member up."""

MAX_NAME_LEN = 512
"""Longest name we read (``KSYM_NAME_LEN`` in 6.1+; real names are under 100 bytes).

Without a bound a blob whose string section has no NUL for megabytes, referenced by many
types at different offsets, would make name decoding quadratic.
"""

POINTER_SIZE = 8
"""BTF does not record the pointer size; vmshield's guests are x86_64."""

_MASK32 = 0xFFFFFFFF


class Kind(IntEnum):
    """``BTF_KIND_*``; ``VOID`` is the implicit type id 0 (``BTF_KIND_UNKN``)."""

    VOID = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Words (u32) of kind-specific data after the 12-byte common record: a fixed part, plus a
# part per ``vlen`` entry. Indexed by the 5-bit kind; -1 marks kinds that do not exist
# (including 0: a record may not claim to be ``void``).
_FIXED = {Kind.INT: 1, Kind.ARRAY: 3, Kind.VAR: 1, Kind.DECL_TAG: 1}
_PER_VLEN = {
    Kind.STRUCT: 3,
    Kind.UNION: 3,
    Kind.ENUM: 2,
    Kind.FUNC_PROTO: 2,
    Kind.DATASEC: 3,
    Kind.ENUM64: 3,
}
_KNOWN_KINDS = {int(kind) for kind in Kind if kind != Kind.VOID}
_FIXED_WORDS = tuple(_FIXED.get(Kind(k), 0) if k in _KNOWN_KINDS else -1 for k in range(32))
_VLEN_WORDS = tuple(_PER_VLEN.get(Kind(k), 0) if k in _KNOWN_KINDS else 0 for k in range(32))

# Kinds that only qualify another type: peeled when we want "the type underneath".
_MODIFIERS = frozenset({Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG})
_MODIFIERS_AND_TYPEDEF = _MODIFIERS | {Kind.TYPEDEF}
# Kinds whose third word is a size in bytes rather than a type id.
_SIZED = frozenset(
    {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT, Kind.DATASEC}
)
# Kinds whose third word is a type id.
_REFERRING = frozenset(
    {
        Kind.PTR,
        Kind.TYPEDEF,
        Kind.VOLATILE,
        Kind.CONST,
        Kind.RESTRICT,
        Kind.FUNC,
        Kind.FUNC_PROTO,
        Kind.VAR,
        Kind.DECL_TAG,
        Kind.TYPE_TAG,
    }
)
_COMPOSITE = (Kind.STRUCT, Kind.UNION)

# The array type code of exactly 4 bytes ('I' is 4 bytes on every platform CPython runs
# on, but do not bet the parser on it).
_U32_CODE = "I" if array("I").itemsize == 4 else "L"
if array(_U32_CODE).itemsize != 4:  # pragma: no cover - exotic platform
    raise ImportError("no 4-byte array type code on this platform")


@dataclass(frozen=True, slots=True)
class BtfMember:
    """One member of a struct or union, with its position normalised to bits.

    ``bitfield_size`` is 0 for an ordinary member. Both BTF encodings of bitfields end up
    here: ``kind_flag`` set (size in the top 8 bits of the offset word) and the older one
    (member type is an ``INT`` whose ``bits``/``offset`` describe the field).
    """

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


@dataclass(frozen=True, slots=True)
class BtfEnumerator:
    """One ``NAME = value`` of an ``ENUM``/``ENUM64``.

    ``value`` is already sign-adjusted: negative for a signed enum (``kind_flag`` set, or
    any 32-bit enum of a pre-6.0 encoder, see ``Btf._legacy_enums``).
    """

    name: str
    value: int


@dataclass(frozen=True, slots=True)
class BtfParam:
    """One parameter of a ``FUNC_PROTO``; ``type_id`` 0 with no name means ``...``."""

    name: str
    type_id: int


@dataclass(frozen=True, slots=True)
class BtfArray:
    """The trailing ``struct btf_array`` of an ``ARRAY`` type."""

    elem_type: int
    index_type: int
    nelems: int


@dataclass(frozen=True, slots=True)
class BtfSecinfo:
    """One variable of a ``DATASEC`` (e.g. a per-cpu variable in ``.data..percpu``)."""

    type_id: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class BtfIntEncoding:
    """The trailing word of an ``INT``: signedness and the bit range actually used."""

    is_signed: bool
    is_char: bool
    is_bool: bool
    offset: int
    bits: int


@dataclass(frozen=True, slots=True)
class BtfType:
    """One decoded type record.

    ``size`` is set for the sized kinds (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC),
    ``ref`` for the kinds that point at another type (PTR, TYPEDEF, CONST, VOLATILE,
    RESTRICT, TYPE_TAG, FUNC -> its FUNC_PROTO, FUNC_PROTO -> return type, VAR, DECL_TAG);
    the other is 0. The kind-specific tuples are empty for the kinds that have none.
    ``linkage`` is meaningful for FUNC and VAR, ``component_idx`` for DECL_TAG (-1 means
    the tag applies to the type itself).
    """

    type_id: int
    kind: Kind
    name: str
    kind_flag: bool
    vlen: int
    size: int = 0
    ref: int = 0
    members: tuple[BtfMember, ...] = ()
    enumerators: tuple[BtfEnumerator, ...] = ()
    params: tuple[BtfParam, ...] = ()
    secinfos: tuple[BtfSecinfo, ...] = ()
    array: BtfArray | None = None
    int_encoding: BtfIntEncoding | None = None
    linkage: int = 0
    component_idx: int = -1


@dataclass(frozen=True, slots=True)
class TypeDesc:
    """What a caller needs to know about a member's type to read it from guest memory.

    ``kind``/``name``/``peeled_id`` describe the type under any typedefs, qualifiers and
    type tags (so ``pid_t`` shows as ``INT`` ``int``); ``c_type`` keeps the declared
    spelling. For a ``PTR`` the ``target_*`` fields describe the pointee, for an ``ARRAY``
    the element (also peeled), and ``nelems`` its length. ``size`` is None for types
    without a size (void, functions, forward declarations).
    """

    type_id: int
    c_type: str
    kind: Kind
    name: str
    peeled_id: int
    size: int | None
    bitfield_size: int = 0
    target_kind: Kind | None = None
    target_name: str | None = None
    target_id: int | None = None
    nelems: int | None = None


def _s32(value: int) -> int:
    return value - 0x1_0000_0000 if value & 0x8000_0000 else value


def parse_btf(data: bytes | bytearray | memoryview) -> Btf:
    """Parse raw BTF bytes; same as :meth:`Btf.parse`."""
    return Btf.parse(data)


class Btf:
    """A parsed BTF blob: type lookups by id and by name, struct layouts, enum values.

    Build it with :meth:`Btf.parse`. Lookups decode records on demand and cache them; the
    object holds its own copy of the bytes, so later changes to the caller's buffer (guest
    memory keeps moving) cannot change an answer half-way.
    """

    __slots__ = (
        "_decoded",
        "_enum_index",
        "_name_index",
        "_offsets",
        "_old_enums",
        "_str_budget",
        "_str_cache",
        "_strs",
        "_words",
    )

    def __init__(self, words: array[int], offsets: array[int], strs: bytes) -> None:
        """Use :meth:`parse`; this only stores already validated parts."""
        self._words = words
        self._offsets = offsets
        self._strs = strs
        self._str_cache: dict[int, str] = {}
        self._str_budget = 4 * len(strs) + (1 << 20)
        self._decoded: dict[int, BtfType] = {}
        self._name_index: dict[str, list[int]] | None = None
        self._enum_index: dict[str, list[tuple[int, int]]] | None = None
        self._old_enums: bool | None = None

    # ------------------------------------------------------------------ parsing

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Btf:
        """Validate the header and sections of raw BTF and index its type records.

        Checks: magic (little-endian only), version 1, the header and both sections lie
        inside ``data`` and do not overlap, the type section is whole u32 words, the string
        section starts and ends with NUL, and every type record has a known kind and fits.
        Kind-specific contents (names, referenced ids, INT encodings) are checked when a
        record is decoded; :meth:`validate` decodes them all.
        """
        blob = bytes(data)
        if len(blob) < _HEADER_SIZE:
            raise GuestFormatError(
                f"BTF blob of {len(blob)} bytes is shorter than the {_HEADER_SIZE}-byte header"
            )
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
            blob, 0
        )
        if magic != BTF_MAGIC:
            if magic == 0x9FEB:
                raise GuestFormatError(
                    "BTF at offset 0 is big-endian (magic bytes eb 9f); only little-endian "
                    "BTF is supported"
                )
            raise GuestFormatError(
                f"bad BTF magic 0x{magic:04x} at offset 0 (expected 0x{BTF_MAGIC:04x})"
            )
        if version != 1:
            raise GuestFormatError(f"unsupported BTF version {version} at offset 2")
        if hdr_len < _HEADER_SIZE or hdr_len > len(blob):
            raise GuestFormatError(
                f"BTF header length {hdr_len} at offset 4 is not within "
                f"{_HEADER_SIZE}..{len(blob)} (blob size)"
            )
        types_start = hdr_len + type_off
        types_end = types_start + type_len
        strs_start = hdr_len + str_off
        strs_end = strs_start + str_len
        if types_end > len(blob):
            raise GuestFormatError(
                f"BTF type section [{types_start}, {types_end}) runs past the end of the "
                f"{len(blob)}-byte blob"
            )
        if strs_end > len(blob):
            raise GuestFormatError(
                f"BTF string section [{strs_start}, {strs_end}) runs past the end of the "
                f"{len(blob)}-byte blob"
            )
        if type_off % 4 or type_len % 4:
            raise GuestFormatError(
                f"BTF type section offset {type_off} / length {type_len} is not a multiple of 4"
            )
        if type_len and str_len and types_start < strs_end and strs_start < types_end:
            raise GuestFormatError(
                f"BTF type section [{types_start}, {types_end}) overlaps string section "
                f"[{strs_start}, {strs_end})"
            )
        if str_len == 0:
            raise GuestFormatError("BTF string section is empty (needs at least the '' name)")
        strs = blob[strs_start:strs_end]
        if strs[0] != 0:
            raise GuestFormatError(
                f"BTF string section at offset {strs_start} does not start with NUL"
            )
        if strs[-1] != 0:
            raise GuestFormatError(
                f"BTF string section [{strs_start}, {strs_end}) does not end with NUL"
            )
        words: array[int] = array(_U32_CODE)
        words.frombytes(blob[types_start:types_end])
        if sys.byteorder == "big":  # pragma: no cover - vmshield runs on x86_64/arm64 LE
            words.byteswap()
        offsets = _index_types(words, types_start)
        return cls(words, offsets, strs)

    def validate(self) -> None:
        """Check every type record now, reporting the first defect anywhere.

        :meth:`parse` is lazy; call this when a blob is to be trusted wholesale (or in
        tests) rather than type by type. It makes exactly the checks :meth:`type` makes
        (names readable, referenced ids in range, INT and ENUM encodings sane) without
        building objects, using slices so that the ~500k members, parameters and
        enumerators of a 6.x kernel are checked at C speed.
        """
        words = self._words
        offsets = self._offsets
        count = len(offsets)
        names = self._str_cache
        string = self._string

        def check_names(type_id: int, name_offsets: array[int]) -> None:
            for name_off in set(name_offsets).difference(names):
                string(name_off, type_id)

        def check_refs(type_id: int, refs: array[int]) -> None:
            if refs and max(refs) >= count:
                self._check_ref(max(refs), type_id)

        for type_id in range(1, count):
            base = offsets[type_id]
            name_off, info, third = words[base], words[base + 1], words[base + 2]
            if name_off not in names:
                string(name_off, type_id)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            data = base + 3
            if kind in _REFERRING:
                self._check_ref(third, type_id)
            if kind == Kind.INT:
                self._int_encoding(type_id, third, words[data])
            elif kind in _COMPOSITE:
                end = data + 3 * vlen
                check_names(type_id, words[data:end:3])
                check_refs(type_id, words[data + 1 : end : 3])
            elif kind in (Kind.ENUM, Kind.ENUM64):
                self._check_enum_size(type_id, Kind(kind), third)
                step = 2 if kind == Kind.ENUM else 3
                check_names(type_id, words[data : data + step * vlen : step])
            elif kind == Kind.ARRAY:
                check_refs(type_id, words[data : data + 2])
            elif kind == Kind.FUNC_PROTO:
                end = data + 2 * vlen
                check_names(type_id, words[data:end:2])
                check_refs(type_id, words[data + 1 : end : 2])
            elif kind == Kind.DATASEC:
                check_refs(type_id, words[data : data + 3 * vlen : 3])

    # ------------------------------------------------------------------ basics

    @property
    def type_count(self) -> int:
        """Number of type records; valid type ids are 0 (void) .. ``type_count``."""
        return len(self._offsets) - 1

    def kind(self, type_id: int) -> Kind:
        """The kind of a type id, without decoding the record."""
        if type_id == 0:
            return Kind.VOID
        return Kind((self._words[self._word_index(type_id) + 1] >> 24) & 0x1F)

    def name_of(self, type_id: int) -> str:
        """The name of a type ('' for anonymous types and for void)."""
        if type_id == 0:
            return ""
        return self._string(self._words[self._word_index(type_id)], type_id)

    def type(self, type_id: int) -> BtfType:
        """Decode (once; cached) the record of ``type_id``, checking its contents."""
        cached = self._decoded.get(type_id)
        if cached is not None:
            return cached
        if type_id == 0:
            decoded = BtfType(type_id=0, kind=Kind.VOID, name="void", kind_flag=False, vlen=0)
        else:
            decoded = self._decode(type_id)
        self._decoded[type_id] = decoded
        return decoded

    def ids_by_name(self, name: str) -> tuple[int, ...]:
        """All type ids (any kind) called ``name``, in id order."""
        return tuple(self._names().get(name, ()))

    def iter_types(self, kind: Kind | None = None) -> Iterator[BtfType]:
        """Every type record (or only those of ``kind``), decoded, in id order.

        Records met only here are not added to the cache: a walk over all ~100k types
        should not leave them all in memory.
        """
        cache = self._decoded
        for type_id in range(1, len(self._offsets)):
            if kind is None or self.kind(type_id) == kind:
                cached = cache.get(type_id)
                yield cached if cached is not None else self._decode(type_id)

    def func_names(self) -> Iterator[str]:
        """The names of all ``FUNC`` records (kernel functions BTF knows), in id order."""
        words = self._words
        for type_id in range(1, len(self._offsets)):
            base = self._offsets[type_id]
            if (words[base + 1] >> 24) & 0x1F == Kind.FUNC:
                yield self._string(words[base], type_id)

    # ------------------------------------------------------------------ lookups

    def find_struct(self, name: str) -> int:
        """Type id of the struct or union ``name`` (a ``struct ``/``union `` prefix is ok).

        Vmlinux BTF can hold a name both as a forward declaration and as a definition, and
        occasionally several definitions; we prefer one with members, then the lowest id.
        A name known only as a forward declaration has no layout: that is a SymbolError.
        """
        bare = name
        wanted: tuple[Kind, ...] = _COMPOSITE
        for prefix, kind in (("struct ", Kind.STRUCT), ("union ", Kind.UNION)):
            if name.startswith(prefix):
                bare = name[len(prefix) :].strip()
                wanted = (kind,)
        found = self._best_composite(bare, wanted)
        if found is None:
            fwd_kinds = {
                Kind.UNION if self.type(i).kind_flag else Kind.STRUCT
                for i in self._names().get(bare, ())
                if self.kind(i) == Kind.FWD
            }
            if fwd_kinds.intersection(wanted):
                raise SymbolError(
                    f"struct/union {bare!r} is only forward-declared in this kernel's BTF"
                )
            raise SymbolError(f"struct/union {bare!r} not found in this kernel's BTF")
        return found

    def find_type(self, name: str) -> int:
        """Type id for a C type name: ``task_struct``, ``struct file``, ``u32``, ``enum x``.

        A bare name is tried as a struct/union first (that is what vmshield mostly asks
        about), then typedef, int, float, enum; ``void`` is id 0. A trailing ``*`` is not
        handled here (pointers have no name in BTF); see :meth:`sizeof`.
        """
        text = " ".join(name.split())
        if text == "void":
            return 0
        if text.startswith(("struct ", "union ")):
            return self.find_struct(text)
        names = self._names()
        if text.startswith("enum "):
            bare = text[len("enum ") :]
            for type_id in names.get(bare, ()):
                if self.kind(type_id) in (Kind.ENUM, Kind.ENUM64):
                    return type_id
            raise SymbolError(f"enum {bare!r} not found in this kernel's BTF")
        best = self._best_composite(text, _COMPOSITE)
        if best is not None:
            return best
        candidates = names.get(text, ())
        for kinds in (
            (Kind.TYPEDEF,),
            (Kind.INT, Kind.FLOAT),
            (Kind.ENUM, Kind.ENUM64),
            (Kind.VAR, Kind.DATASEC),
        ):
            for type_id in candidates:
                if self.kind(type_id) in kinds:
                    return type_id
        raise SymbolError(f"type {text!r} not found in this kernel's BTF")

    def sizeof(self, type_name_or_id: str | int) -> int:
        """Size in bytes of a type, through typedefs, qualifiers and arrays.

        A name ending in ``*`` is a pointer (:data:`POINTER_SIZE`, after checking that the
        pointee exists). Types without a size (void, functions, forward declarations) are
        a SymbolError; a cyclic or absurd chain in the blob is a GuestFormatError.
        """
        if isinstance(type_name_or_id, str):
            text = type_name_or_id.strip()
            if text.endswith("*"):
                base = text.rstrip("*").strip()
                if base:
                    self.find_type(base)
                return POINTER_SIZE
            type_id = self.find_type(text)
        else:
            type_id = type_name_or_id
        size = self._size_or_none(type_id)
        if size is None:
            raise SymbolError(
                f"type id {type_id} ({self.kind(type_id).name} {self.name_of(type_id)!r}) "
                "has no size"
            )
        return size

    def member_offset(self, struct: str | int, path: str) -> int:
        """Byte offset of ``path`` (``"comm"``, ``"se.vruntime"``) in ``struct``.

        The path goes through *embedded* members only (each component but the last must
        be a struct or union, never a pointer: following a pointer needs a memory read).
        Members of anonymous structs/unions are found as C finds them: ``mm_struct.pgd``
        sits in an anonymous struct, ``task_struct.rcu_users`` in an anonymous union (5.10,
        6.1), and with ``CONFIG_RANDSTRUCT`` most of ``task_struct`` is wrapped so.
        A bitfield has no byte offset: use :meth:`member_bit_offset`.
        """
        struct_id, owner = self._struct_arg(struct)
        bit_offset, member = self._walk_path(struct_id, owner, path)
        if member.bitfield_size:
            raise SymbolError(
                f"{owner}.{path} is a {member.bitfield_size}-bit bitfield at bit "
                f"{bit_offset}; it has no byte offset (use member_bit_offset)"
            )
        if bit_offset % 8:
            raise GuestFormatError(
                f"{owner}.{path} (type id {member.type_id}) is not a bitfield but starts at "
                f"bit {bit_offset}, not on a byte boundary"
            )
        return bit_offset // 8

    def member_bit_offset(self, struct: str | int, path: str) -> tuple[int, int]:
        """``(bit_offset, bit_size)`` of ``path`` in ``struct``: works for bitfields too.

        ``bit_size`` is the bitfield width, or for an ordinary member its size in bits.
        """
        struct_id, owner = self._struct_arg(struct)
        bit_offset, member = self._walk_path(struct_id, owner, path)
        if member.bitfield_size:
            return bit_offset, member.bitfield_size
        return bit_offset, self.sizeof(member.type_id) * 8

    def member_type(self, struct: str | int, path: str) -> TypeDesc:
        """Describe the type of member ``path`` of ``struct`` (see :class:`TypeDesc`).

        E.g. ``task_struct.comm`` is ARRAY of 16 INT ``char``; ``task_struct.real_parent``
        is PTR with target STRUCT ``task_struct``.
        """
        struct_id, owner = self._struct_arg(struct)
        _, member = self._walk_path(struct_id, owner, path)
        return self.describe(member.type_id, bitfield_size=member.bitfield_size)

    def describe(self, type_id: int, *, bitfield_size: int = 0) -> TypeDesc:
        """A :class:`TypeDesc` of any type id (what :meth:`member_type` returns)."""
        peeled = self._peel(type_id, _MODIFIERS_AND_TYPEDEF)
        kind = self.kind(peeled)
        target_kind: Kind | None = None
        target_name: str | None = None
        target_id: int | None = None
        nelems: int | None = None
        if kind == Kind.PTR:
            target_id = self._peel(self._ref(peeled), _MODIFIERS_AND_TYPEDEF)
        elif kind == Kind.ARRAY:
            info = self.type(peeled).array
            assert info is not None
            nelems = info.nelems
            target_id = self._peel(info.elem_type, _MODIFIERS_AND_TYPEDEF)
        if target_id is not None:
            target_kind = self.kind(target_id)
            target_name = self.name_of(target_id)
        c_type = self.type_name(type_id)
        if bitfield_size:
            c_type = f"{c_type}:{bitfield_size}"
        return TypeDesc(
            type_id=type_id,
            c_type=c_type,
            kind=kind,
            name=self.name_of(peeled),
            peeled_id=peeled,
            size=self._size_or_none(type_id),
            bitfield_size=bitfield_size,
            target_kind=target_kind,
            target_name=target_name,
            target_id=target_id,
            nelems=nelems,
        )

    def type_name(self, type_id: int) -> str:
        """A C-like spelling of a type: ``const struct cred *``, ``char[16]``.

        Good enough for messages and for a human; bounded in work whatever the blob holds
        (at most a few hundred records are visited, then ``...`` is printed).
        """
        budget = [256]
        return self._render(type_id, "", budget)

    def enum_value(self, enum_name: str | None, enumerator: str) -> int:
        """Value of ``enumerator``, in enum ``enum_name`` or (None) in any enum.

        With no enum named, an enumerator that appears with different values in several
        enums is ambiguous: SymbolError rather than a silent pick.
        """
        if enum_name is not None:
            bare = enum_name.removeprefix("enum ").strip()
            enum_ids = [
                i for i in self._names().get(bare, ()) if self.kind(i) in (Kind.ENUM, Kind.ENUM64)
            ]
            if not enum_ids:
                raise SymbolError(f"enum {bare!r} not found in this kernel's BTF")
            for enum_id in enum_ids:
                for item in self.type(enum_id).enumerators:
                    if item.name == enumerator:
                        return item.value
            raise SymbolError(f"enum {bare!r} has no enumerator {enumerator!r}")
        hits = self._enums().get(enumerator)
        if not hits:
            raise SymbolError(f"enumerator {enumerator!r} not found in any enum")
        values = {value for _, value in hits}
        if len(values) > 1:
            shown = ", ".join(f"{value} (type id {type_id})" for type_id, value in hits[:6])
            raise SymbolError(
                f"enumerator {enumerator!r} is ambiguous: {len(values)} different values in "
                f"{len(hits)} enums, e.g. {shown}; name the enum"
            )
        return hits[0][1]

    # ------------------------------------------------------------------ internals

    def _word_index(self, type_id: int) -> int:
        """Where the record of ``type_id`` starts in the word array; range-checked."""
        if not 0 < type_id < len(self._offsets):
            raise GuestFormatError(
                f"type id {type_id} out of range (this BTF has ids 0..{len(self._offsets) - 1})"
            )
        return self._offsets[type_id]

    def _string(self, offset: int, type_id: int) -> str:
        """The NUL-terminated name at ``offset`` in the string section, bounded in length."""
        cached = self._str_cache.get(offset)
        if cached is not None:
            return cached
        strs = self._strs
        if offset >= len(strs):
            raise GuestFormatError(
                f"name offset {offset} of type id {type_id} is outside the "
                f"{len(strs)}-byte string section"
            )
        end = strs.find(0, offset, offset + MAX_NAME_LEN + 1)
        if end < 0:
            raise GuestFormatError(
                f"name at string offset {offset} (type id {type_id}) is longer than "
                f"{MAX_NAME_LEN} bytes"
            )
        self._charge_strings(end - offset + 1, offset, type_id)
        text = strs[offset:end].decode("utf-8", "backslashreplace")
        self._str_cache[offset] = text
        return text

    def _charge_strings(self, size: int, offset: int, type_id: int) -> None:
        """Account for ``size`` more bytes of cached names; refuse past the budget.

        Names referenced at every byte of a long string (overlapping suffixes) would let
        a small blob make us hold ~``MAX_NAME_LEN`` times its size in text. Real BTF refers
        to each string once, so a few times the string section is plenty.
        """
        self._str_budget -= size
        if self._str_budget < 0:
            raise GuestFormatError(
                f"names referenced at overlapping string offsets (offset {offset}, type id "
                f"{type_id}) add up to more than 4x the string section"
            )

    def _ref(self, type_id: int) -> int:
        """The third word of a record, as a type id (for the referring kinds)."""
        ref = self._words[self._word_index(type_id) + 2]
        self._check_ref(ref, type_id)
        return ref

    def _check_ref(self, ref: int, type_id: int) -> None:
        if ref >= len(self._offsets):
            raise GuestFormatError(
                f"type id {type_id} refers to type id {ref}, out of range "
                f"(this BTF has ids 0..{len(self._offsets) - 1})"
            )

    def _decode(self, type_id: int) -> BtfType:
        words = self._words
        base = self._word_index(type_id)
        name_off, info, size_or_type = words[base], words[base + 1], words[base + 2]
        kind = Kind((info >> 24) & 0x1F)
        kind_flag = bool(info >> 31)
        vlen = info & 0xFFFF
        name = self._string(name_off, type_id)
        data = base + 3
        if kind in _REFERRING:
            self._check_ref(size_or_type, type_id)
        if kind == Kind.INT:
            return BtfType(
                type_id,
                kind,
                name,
                kind_flag,
                vlen,
                size=size_or_type,
                int_encoding=self._int_encoding(type_id, size_or_type, words[data]),
            )
        if kind in (Kind.STRUCT, Kind.UNION):
            return BtfType(
                type_id,
                kind,
                name,
                kind_flag,
                vlen,
                size=size_or_type,
                members=self._members(type_id, data, vlen, kind_flag),
            )
        if kind in (Kind.ENUM, Kind.ENUM64):
            self._check_enum_size(type_id, kind, size_or_type)
            return BtfType(
                type_id,
                kind,
                name,
                kind_flag,
                vlen,
                size=size_or_type,
                enumerators=self._enumerators(type_id, kind, data, vlen, kind_flag),
            )
        if kind == Kind.ARRAY:
            elem, index, nelems = words[data], words[data + 1], words[data + 2]
            self._check_ref(elem, type_id)
            self._check_ref(index, type_id)
            return BtfType(
                type_id, kind, name, kind_flag, vlen, array=BtfArray(elem, index, nelems)
            )
        if kind == Kind.FUNC_PROTO:
            params = []
            for i in range(vlen):
                p_name, p_type = words[data + 2 * i], words[data + 2 * i + 1]
                self._check_ref(p_type, type_id)
                params.append(BtfParam(self._string(p_name, type_id), p_type))
            return BtfType(
                type_id, kind, name, kind_flag, vlen, ref=size_or_type, params=tuple(params)
            )
        if kind == Kind.DATASEC:
            secinfos = []
            for i in range(vlen):
                at = data + 3 * i
                self._check_ref(words[at], type_id)
                secinfos.append(BtfSecinfo(words[at], words[at + 1], words[at + 2]))
            return BtfType(
                type_id, kind, name, kind_flag, vlen, size=size_or_type, secinfos=tuple(secinfos)
            )
        if kind == Kind.FUNC:
            return BtfType(type_id, kind, name, kind_flag, vlen, ref=size_or_type, linkage=vlen)
        if kind == Kind.VAR:
            return BtfType(
                type_id, kind, name, kind_flag, vlen, ref=size_or_type, linkage=words[data]
            )
        if kind == Kind.DECL_TAG:
            return BtfType(
                type_id,
                kind,
                name,
                kind_flag,
                vlen,
                ref=size_or_type,
                component_idx=_s32(words[data]),
            )
        if kind == Kind.FLOAT:
            return BtfType(type_id, kind, name, kind_flag, vlen, size=size_or_type)
        if kind == Kind.FWD:
            return BtfType(type_id, kind, name, kind_flag, vlen)
        # PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
        return BtfType(type_id, kind, name, kind_flag, vlen, ref=size_or_type)

    @staticmethod
    def _check_enum_size(type_id: int, kind: Kind, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise GuestFormatError(f"{kind.name} type id {type_id} has invalid size {size}")

    @staticmethod
    def _int_encoding(type_id: int, size: int, word: int) -> BtfIntEncoding:
        encoding = (word >> 24) & 0x0F
        offset = (word >> 16) & 0xFF
        bits = word & 0xFF
        if size not in (1, 2, 4, 8, 16):
            raise GuestFormatError(f"INT type id {type_id} has invalid size {size}")
        if word & 0xF000_0000 or encoding not in (0, 1, 2, 4) or offset + bits > size * 8:
            raise GuestFormatError(
                f"INT type id {type_id} has invalid encoding word 0x{word:08x} for size {size}"
            )
        return BtfIntEncoding(
            is_signed=bool(encoding & 1),
            is_char=bool(encoding & 2),
            is_bool=bool(encoding & 4),
            offset=offset,
            bits=bits,
        )

    def _members(
        self, type_id: int, data: int, vlen: int, kind_flag: bool
    ) -> tuple[BtfMember, ...]:
        words = self._words
        members = []
        for i in range(vlen):
            at = data + 3 * i
            m_name, m_type, m_offset = words[at], words[at + 1], words[at + 2]
            self._check_ref(m_type, type_id)
            if kind_flag:
                bit_offset, bitfield_size = m_offset & 0xFFFFFF, m_offset >> 24
            else:
                bit_offset, bitfield_size = m_offset, 0
                # The pre-kind_flag encoding: a member whose type is an INT narrower than
                # its storage (or shifted inside it) is a bitfield.
                if m_type and self.kind(m_type) == Kind.INT:
                    t_base = self._offsets[m_type]
                    t_size, t_word = words[t_base + 2], words[t_base + 3]
                    t_bits, t_shift = t_word & 0xFF, (t_word >> 16) & 0xFF
                    if t_shift or t_bits != t_size * 8:
                        bit_offset, bitfield_size = bit_offset + t_shift, t_bits
            members.append(
                BtfMember(self._string(m_name, type_id), m_type, bit_offset, bitfield_size)
            )
        return tuple(members)

    def _enumerators(
        self, type_id: int, kind: Kind, data: int, vlen: int, kind_flag: bool
    ) -> tuple[BtfEnumerator, ...]:
        """Decode enumerator values; ``kind_flag`` set means signed (see :meth:`_legacy_enums`)."""
        words = self._words
        items = []
        if kind == Kind.ENUM:
            signed = kind_flag or self._legacy_enums()
            for i in range(vlen):
                raw = words[data + 2 * i + 1]
                value = _s32(raw) if signed else raw
                items.append(BtfEnumerator(self._string(words[data + 2 * i], type_id), value))
        else:
            for i in range(vlen):
                at = data + 3 * i
                raw = words[at + 1] | (words[at + 2] << 32)
                if kind_flag and raw >> 63:
                    raw -= 1 << 64
                items.append(BtfEnumerator(self._string(words[at], type_id), raw))
        return tuple(items)

    def _legacy_enums(self) -> bool:
        """Whether this blob predates the signedness flag of ENUM (pahole < 1.24, 5.10).

        Since Linux 6.0 an ENUM's ``kind_flag`` says "signed"; before, it was always 0 and
        the value field was a plain ``__s32``, so ``PERF_EVENT_STATE_DEAD`` is -4, not
        4294967292. A blob written by a new encoder uses the flag on some enum (or has
        ENUM64, added together with it); a blob with neither is read the old way.
        """
        if self._old_enums is None:
            words = self._words
            offsets = self._offsets
            legacy = True
            for type_id in range(1, len(offsets)):
                info = words[offsets[type_id] + 1]
                kind = (info >> 24) & 0x1F
                if kind == Kind.ENUM64 or (kind == Kind.ENUM and info >> 31):
                    legacy = False
                    break
            self._old_enums = legacy
        return self._old_enums

    def _names(self) -> dict[str, list[int]]:
        """name -> type ids (in id order), built on first use in one pass over the records.

        The string section is decoded in bulk first (one split, C speed) so that the ~100k
        names of a kernel do not each cost a bounded ``find`` plus a ``decode``; names that
        start mid-string, or are too long, still go through :meth:`_string` and its checks.
        """
        if self._name_index is None:
            self._preload_strings()
            words = self._words
            names = self._str_cache
            string = self._string
            index: dict[str, list[int]] = {}
            # Index 0 of _offsets is void's placeholder, not a record: skip it.
            name_offsets = [0, *(words[base] for base in self._offsets[1:])]
            for type_id in range(1, len(name_offsets)):
                name_off = name_offsets[type_id]
                if not name_off:
                    continue
                name = names.get(name_off)
                if name is None:
                    name = string(name_off, type_id)
                bucket = index.get(name)
                if bucket is None:
                    index[name] = [type_id]
                else:
                    bucket.append(type_id)
            self._name_index = index
        return self._name_index

    def _preload_strings(self) -> None:
        """Fill the string cache with every NUL-terminated string of the string section.

        Strings longer than :data:`MAX_NAME_LEN` are left out, so a lookup of one still
        fails in :meth:`_string` exactly as it would without the preload.
        """
        strs = self._strs
        if strs.count(0) > 2 * len(self._offsets) + 1024:
            return  # far more strings than types: not a real kernel's; go one by one
        cache = self._str_cache
        offset = 0
        for raw in strs.split(b"\0"):
            if len(raw) <= MAX_NAME_LEN and offset not in cache:
                self._charge_strings(len(raw) + 1, offset, 0)
                cache[offset] = raw.decode("utf-8", "backslashreplace")
            offset += len(raw) + 1

    def _enums(self) -> dict[str, list[tuple[int, int]]]:
        """enumerator name -> (enum type id, value), built on first use."""
        if self._enum_index is None:
            index: dict[str, list[tuple[int, int]]] = {}
            for type_id in range(1, len(self._offsets)):
                if self.kind(type_id) in (Kind.ENUM, Kind.ENUM64):
                    for item in self.type(type_id).enumerators:
                        index.setdefault(item.name, []).append((type_id, item.value))
            self._enum_index = index
        return self._enum_index

    def _best_composite(self, name: str, kinds: tuple[Kind, ...]) -> int | None:
        """Lowest-id struct/union ``name`` with members, else lowest-id one without."""
        fallback: int | None = None
        words = self._words
        for type_id in self._names().get(name, ()):
            info = words[self._offsets[type_id] + 1]
            if (info >> 24) & 0x1F in kinds:
                if info & 0xFFFF:
                    return type_id
                if fallback is None:
                    fallback = type_id
        return fallback

    def _struct_arg(self, struct: str | int) -> tuple[int, str]:
        """Resolve a struct argument (name or id) to ``(id, name for messages)``."""
        if isinstance(struct, str):
            struct_id = self.find_struct(struct)
            return struct_id, struct.removeprefix("struct ").removeprefix("union ").strip()
        peeled = self._peel(struct, _MODIFIERS_AND_TYPEDEF) if struct else struct
        if self.kind(peeled) not in _COMPOSITE:
            raise SymbolError(
                f"type id {struct} is {self.kind(peeled).name}, not a struct or union"
            )
        return peeled, self.name_of(peeled) or f"<anon type id {peeled}>"

    def _walk_path(self, struct_id: int, owner: str, path: str) -> tuple[int, BtfMember]:
        """Follow a dotted member path; return the total bit offset and the last member."""
        parts = path.split(".")
        if not path or any(not part for part in parts):
            raise SymbolError(f"invalid member path {path!r} for struct {owner!r}")
        current = struct_id
        total = 0
        member: BtfMember | None = None
        for depth, part in enumerate(parts):
            if depth:
                assert member is not None
                peeled = self._peel(member.type_id, _MODIFIERS_AND_TYPEDEF)
                if member.bitfield_size or self.kind(peeled) not in _COMPOSITE:
                    walked = ".".join(parts[:depth])
                    raise SymbolError(
                        f"{owner}.{walked} is {self.type_name(member.type_id)!r}, not an "
                        f"embedded struct/union, so {path!r} cannot be followed without a "
                        "memory read"
                    )
                current = peeled
            found = self._find_member(current, part)
            if found is None:
                where = owner if not depth else f"{owner}.{'.'.join(parts[:depth])}"
                raise SymbolError(f"struct {where!r} has no member {part!r}")
            bit_offset, member = found
            total += bit_offset
        assert member is not None
        return total, member

    def _find_member(self, struct_id: int, name: str) -> tuple[int, BtfMember] | None:
        """Find ``name`` in a struct/union, looking inside anonymous members as C does.

        Depth-first in declaration order. ``searched`` is shared by the whole search: a
        struct already searched cannot hold the name elsewhere either, so each struct is
        scanned at most once and a cyclic or exponentially shared layout stays linear.
        """
        searched: set[int] = set()

        def search(sid: int, nesting: int) -> tuple[int, BtfMember] | None:
            if sid in searched:
                return None
            searched.add(sid)
            members = self.type(sid).members
            for member in members:
                if member.name == name:
                    return member.bit_offset, member
            for member in members:
                if member.name or member.bitfield_size:
                    continue
                inner = self._peel(member.type_id, _MODIFIERS_AND_TYPEDEF)
                if self.kind(inner) not in _COMPOSITE:
                    continue
                if nesting >= MAX_NESTING:
                    raise GuestFormatError(
                        f"anonymous members nested deeper than {MAX_NESTING} under type id "
                        f"{struct_id} (at type id {inner})"
                    )
                hit = search(inner, nesting + 1)
                if hit is not None:
                    return member.bit_offset + hit[0], hit[1]
            return None

        return search(struct_id, 0)

    def _peel(self, type_id: int, kinds: frozenset[Kind]) -> int:
        """Follow ``type_id`` through ``kinds`` (typedefs, qualifiers); cycle-safe."""
        seen: set[int] = set()
        current = type_id
        while True:
            if self.kind(current) not in kinds:
                return current
            if current in seen:
                raise GuestFormatError(f"type reference cycle through type id {current}")
            seen.add(current)
            if len(seen) > MAX_CHAIN:
                raise GuestFormatError(
                    f"type reference chain from type id {type_id} is longer than {MAX_CHAIN}"
                )
            current = self._ref(current)

    def _size_or_none(self, type_id: int) -> int | None:
        """sizeof, or None for unsized kinds; arrays multiply, chains are bounded."""
        multiplier = 1
        current = type_id
        seen: set[int] = set()
        while True:
            kind = self.kind(current)
            if kind in _SIZED:
                size = self._words[self._offsets[current] + 2] * multiplier
                if size >> 64:
                    raise GuestFormatError(
                        f"size of type id {type_id} overflows 64 bits ({size} bytes)"
                    )
                return size
            if kind == Kind.PTR:
                return POINTER_SIZE * multiplier
            if kind not in _MODIFIERS_AND_TYPEDEF and kind not in (Kind.ARRAY, Kind.VAR):
                return None
            if current in seen:
                raise GuestFormatError(f"type reference cycle through type id {current}")
            seen.add(current)
            if len(seen) > MAX_CHAIN:
                raise GuestFormatError(
                    f"type reference chain from type id {type_id} is longer than {MAX_CHAIN}"
                )
            if kind == Kind.ARRAY:
                info = self.type(current).array
                assert info is not None
                multiplier *= info.nelems
                if multiplier >> 64:
                    raise GuestFormatError(f"array size of type id {type_id} overflows 64 bits")
                current = info.elem_type
            else:
                current = self._ref(current)

    def _render(self, type_id: int, declarator: str, budget: list[int]) -> str:
        """C declarator rendering with a shared work budget (see :meth:`type_name`)."""
        budget[0] -= 1
        if budget[0] < 0:
            return f"...{(' ' + declarator) if declarator else ''}"
        kind = self.kind(type_id)
        if kind == Kind.PTR:
            target = self._ref(type_id)
            inner = "*" + declarator
            if self.kind(self._peel_for_render(target)) in (Kind.ARRAY, Kind.FUNC_PROTO):
                inner = f"({inner})"
            return self._render(target, inner, budget)
        if kind == Kind.ARRAY:
            info = self.type(type_id).array
            assert info is not None
            return self._render(info.elem_type, f"{declarator}[{info.nelems}]", budget)
        if kind in (Kind.CONST, Kind.VOLATILE, Kind.RESTRICT):
            qualifier = kind.name.lower()
            target = self._ref(type_id)
            if self.kind(target) == Kind.PTR:
                return self._render(target, f"{qualifier} {declarator}".rstrip(), budget)
            return f"{qualifier} {self._render(target, declarator, budget)}"
        if kind in (Kind.TYPE_TAG, Kind.VAR, Kind.DECL_TAG, Kind.FUNC):
            return self._render(self._ref(type_id), declarator, budget)
        if kind == Kind.FUNC_PROTO:
            proto = self.type(type_id)
            params = []
            for param in proto.params:
                if budget[0] <= 0:
                    params.append("...")
                    break
                if param.type_id == 0 and not param.name:
                    params.append("...")
                else:
                    params.append(self._render(param.type_id, "", budget))
            text = f"{declarator}({', '.join(params) or 'void'})"
            return self._render(proto.ref, text, budget)
        if kind == Kind.VOID:
            base = "void"
        elif kind in (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64):
            keyword = "enum" if kind == Kind.ENUM64 else kind.name.lower()
            base = f"{keyword} {self.name_of(type_id) or '(anon)'}"
        elif kind == Kind.FWD:
            keyword = "union" if self.type(type_id).kind_flag else "struct"
            base = f"{keyword} {self.name_of(type_id)}"
        else:  # INT, FLOAT, TYPEDEF, DATASEC
            base = self.name_of(type_id) or f"<anon {kind.name} {type_id}>"
        if not declarator:
            return base
        return f"{base}{declarator}" if declarator.startswith("[") else f"{base} {declarator}"

    def _peel_for_render(self, type_id: int) -> int:
        """Peel qualifiers only; a cycle here is reported by the later walk, not here."""
        try:
            return self._peel(type_id, _MODIFIERS)
        except GuestFormatError:
            return type_id


def _index_types(words: array[int], section_offset: int) -> array[int]:
    """Walk the type section once; return the word index where each record starts.

    Index 0 is a placeholder for ``void``. This is the only full pass :meth:`Btf.parse`
    makes, so it is kept to plain integer arithmetic. Its allocation is bounded by the
    section's real length (a record is at least 3 words), never by a claimed count.
    """
    offsets: array[int] = array(_U32_CODE, [0])
    append = offsets.append
    fixed = _FIXED_WORDS
    per_vlen = _VLEN_WORDS
    total = len(words)
    at = 0
    while at < total:
        if total - at < 3:
            raise GuestFormatError(
                f"BTF type id {len(offsets)} at byte {section_offset + 4 * at} is truncated "
                f"(record header needs 12 bytes, {4 * (total - at)} left)"
            )
        info = words[at + 1]
        kind = (info >> 24) & 0x1F
        extra = fixed[kind]
        if extra < 0:
            raise GuestFormatError(
                f"BTF type id {len(offsets)} at byte {section_offset + 4 * at} has unknown "
                f"kind {kind}"
            )
        end = at + 3 + extra + (info & 0xFFFF) * per_vlen[kind]
        if end > total:
            raise GuestFormatError(
                f"BTF type id {len(offsets)} at byte {section_offset + 4 * at} "
                f"({Kind(kind).name}, vlen {info & 0xFFFF}) runs past the end of the type "
                "section"
            )
        append(at)
        at = end
    return offsets
