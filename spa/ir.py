"""A small in-memory IR over the ONNX protobuf.

Why not onnx-ir: importing onnx_ir 1.1 costs ~0.6-0.9 s on the reference 2-core machine (it pulls in sympy),
which alone would break the 1 s whole-process budget for pruning ResNet-50.  This module keeps the protobuf as
the source of truth and adds what the passes need: use-def maps, numpy views of initializers (decoded lazily,
never edited in place), unique naming and static shapes from shape inference.
"""
from __future__ import annotations

import atexit
import mmap
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

from .errors import SpaError
from .fileio import temp_path_beside
from .validate import check_input, check_tensor

MAX_IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; 10 is what current exporters write and is accepted widely
MAX_OPSET = 26
EXTERNAL_DATA_BYTES = 1_800_000_000  # weights past this go to an external-data file (protobuf's limit is 2 GB)
EXTERNAL_TENSOR_MIN_BYTES = 1024     # smaller tensors (shape constants, which inference reads) stay in the model file
EXTERNAL_ALIGN_BYTES = 4096         # offsets of larger external tensors are multiples of this (a page)
SPILL_MIN_BYTES = 65536              # a mapped model's new values from this size on are written to its spill file


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def slice_params(node: onnx.NodeProto, consts: list) -> tuple[list, list, list | None, list | None] | None:
    """(starts, ends, axes, steps) of a Slice: attributes before opset 10 (`consts` unused), else its constant
    inputs 1-4 (`consts`, None where an input is absent); None where a given bound is not constant. axes / steps
    None: absent (all leading axes / 1)."""
    if len(node.input) == 1:  # opset < 10: attributes
        starts, ends = attr(node, "starts"), attr(node, "ends")
        return None if starts is None or ends is None else (list(starts), list(ends), attr(node, "axes"), None)
    consts = list(consts) + [None] * (4 - len(consts))
    given = [i < len(node.input) - 1 and bool(node.input[i + 1]) for i in range(4)]
    if any(g and c is None for g, c in zip(given, consts)) or not (given[0] and given[1]):
        return None
    ints = lambda v: None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]  # noqa: E731
    return ints(consts[0]), ints(consts[1]), ints(consts[2]), ints(consts[3])


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def subgraph_free_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    free: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                defined.update(n.output)
            for n in g.node:
                free.update(x for x in n.input if x and x not in defined)
                free.update(x for x in subgraph_free_names(n) if x not in defined)
            free.update(o.name for o in g.output if o.name not in defined)
    return free


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies a node carries (If's two branches, Loop/Scan's body), in attribute order."""
    return [b for a in node.attribute for b in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def walk_graphs(graph: onnx.GraphProto):
    """A graph and every subgraph inside it, depth first (a graph before the bodies its nodes carry)."""
    yield graph
    for n in graph.node:
        for b in subgraphs(n):
            yield from walk_graphs(b)


def walk_nodes(graph: onnx.GraphProto):
    """(node, the graph that holds it) for every node of a graph and of its subgraphs, depth first: a node
    before the nodes of its bodies. Two copies of one model walk in the same order (verification relies on it)."""
    for n in graph.node:
        yield n, graph
        for b in subgraphs(n):
            yield from walk_nodes(b)


@dataclass
class Graph:
    """The main graph of a model plus the maps every pass needs.

    Nodes are the protobuf NodeProtos (edited in place); initializers are held as numpy arrays in `arrays`
    (decoded on first use) and written back to the protobuf only by `to_model`. The maps are flat over the main
    graph and every subgraph (If branches, Loop/Scan bodies): normalization makes names unique model-wide
    (`passes.normalize.unique_names`), so a body's weights, producers and shapes are found by name like
    the main graph's. `nodes` stays the main graph's; `owner` says which graph holds a node.
    """

    model: onnx.ModelProto
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)  # static shapes for analysis (name -> tuple of ints)
    dtypes: dict[str, int] = field(default_factory=dict)
    _tensors: dict[str, onnx.TensorProto] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set)
    _dirty: set[str] = field(default_factory=set)  # initializers whose numpy value is newer than the protobuf
    raw: RawWeights | None = None  # zero-copy views of the file's weight bytes (read_model)

    def __post_init__(self):
        self._tensors = {t.name: t for t in self.model.graph.initializer}
        self._holder: dict[str, onnx.GraphProto] = {}  # initializers of subgraphs -> the body that holds them
        for body in list(walk_graphs(self.model.graph))[1:]:
            for t in body.initializer:
                self._tensors.setdefault(t.name, t)
                self._holder.setdefault(t.name, body)
        self.mapped = any(is_mapped(t) for t in self._tensors.values())  # weights live in files: see MappedWeights
        self._names = set(self._tensors)
        for body in walk_graphs(self.model.graph):
            for n in body.node:
                self._names.update(n.output)
                self._names.add(n.name)
            self._names.update(i.name for i in body.input)
        self.refresh()

    # ---- structure -------------------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input if i.name not in self._tensors]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def refresh(self) -> None:
        """Rebuild the use-def maps after nodes were added or removed."""
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.owner: dict[int, onnx.GraphProto] = {}  # id(node) -> the graph that holds it
        for n, holder in walk_nodes(self.model.graph):
            self.owner[id(n)] = holder
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i, x in enumerate(n.input):
                if x:
                    self.consumers.setdefault(x, []).append((n, i))
            for x in subgraph_free_names(n) if has_subgraph(n) else ():
                self.consumers.setdefault(x, []).append((n, -1))

    def is_const(self, name: str) -> bool:
        return name in self._tensors or name in self.arrays

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer as a read-only numpy array, or None for runtime tensors."""
        if not name:
            return None
        arr = self.arrays.get(name)
        if arr is None:
            t = self._tensors.get(name)
            if t is None:
                return None
            arr = self.raw.view(t) if self.raw is not None else None
            if arr is None:
                arr = _decode(t)
            arr.setflags(write=False)
            self.arrays[name] = arr
        return arr

    def set_const(self, name: str, value: np.ndarray, holder: onnx.GraphProto | None = None) -> None:
        """Replace (or create) an initializer's value. Shapes of the value are updated with it. A new one goes
        into `holder` (a subgraph) when given, else into the main graph (visible in every body)."""
        value = np.asarray(value)
        if name not in self._tensors:
            if holder is not None and holder is not self.model.graph:
                self._holder[name] = holder
            t = (holder or self.model.graph).initializer.add()  # add(), not append(): append stores a copy
            t.name = name
            self._tensors[name] = t
        if self.mapped and value.nbytes >= SPILL_MIN_BYTES and value.dtype.kind in "fiub":
            value = MAPPED.spill(self._tensors[name], value)  # the model's weights stay out of memory
            self._dirty.discard(name)
        else:
            t = self._tensors[name]
            if t.data_location == onnx.TensorProto.EXTERNAL:
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
            t.ClearField("raw_data")  # marks it dirty; rewritten in to_model
            self._dirty.add(name)
        value.setflags(write=False)
        self.arrays[name] = value
        self.shapes[name] = tuple(value.shape)
        self._names.add(name)

    def add_const(self, value: np.ndarray, base: str) -> str:
        name = self.unique(base)
        self.set_const(name, value)
        return name

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name = f"{base}_{k}"
            k += 1
        self._names.add(name)
        return name

    def remove_initializer(self, name: str) -> None:
        t = self._tensors.pop(name, None)
        if t is not None:
            self._holder.pop(name, self.model.graph).initializer.remove(t)
        self.arrays.pop(name, None)
        self._dirty.discard(name)

    def const_info(self, name: str) -> tuple[tuple, np.dtype]:
        """Shape and dtype of an initializer without decoding its bytes."""
        if name in self.arrays:
            a = self.arrays[name]
            return tuple(a.shape), a.dtype
        t = self._tensors[name]
        return tuple(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type)

    def initializer_names(self) -> list[str]:
        """Every initializer's name, those of subgraphs included."""
        return list(self._tensors)

    def in_subgraph(self, name: str) -> bool:
        """Whether an initializer is held by a subgraph (a branch's or a loop body's own weight)."""
        return name in self._holder

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    # ---- output ----------------------------------------------------------------------------------------------
    def to_model(self) -> onnx.ModelProto:
        """Write changed initializers back into the protobuf and return the model."""
        for name in list(self._dirty):
            self.to_model_tensor(name)
        return self.model

    def to_model_tensor(self, name: str) -> None:
        """Write one changed initializer back into the protobuf."""
        if name in self._dirty:
            new = numpy_helper.from_array(np.array(self.arrays[name], order="C"), name)  # keeps 0-d (ascontiguousarray would not)
            self._tensors[name].CopyFrom(new)
            self._dirty.discard(name)


# Element types whose raw little-endian bytes numpy views as they are (no conversion pass)
RAW_VIEW_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64,
                  onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                  onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def _decode(t: onnx.TensorProto) -> np.ndarray:
    """A tensor's value; plain little-endian raw data is viewed without a conversion pass. The header is checked
    against the data first (spa.validate), so a malformed tensor is a one-line SpaError naming it."""
    check_tensor(t, f"tensor '{t.name}'")
    if is_mapped(t):
        return MAPPED.view(t)
    if t.data_type in RAW_VIEW_TYPES and t.data_location != onnx.TensorProto.EXTERNAL and sys.byteorder == "little":
        raw = t.raw_data
        if raw:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def tensor_value(t: onnx.TensorProto) -> np.ndarray:
    """A TensorProto's value (read-only; a view where its bytes allow), mapped external data included."""
    return _decode(t)


# ---- mapped weights --------------------------------------------------------------------------------------------
def is_mapped(t: onnx.TensorProto) -> bool:
    """An initializer whose bytes stay in a file (spa.validate resolved the input's external data to an absolute
    path; the spill file of new values): its value is a read-only memory map, never a copy."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return False
    location = next((e.value for e in t.external_data if e.key == "location"), "")
    return os.path.isabs(location)


def has_mapped(model: onnx.ModelProto) -> bool:
    return any(is_mapped(t) for t in model.graph.initializer)


class MappedWeights:
    """The files a process maps weights from: the input's external-data files, read-only, and a spill file that
    takes the values a mapped model's passes make (pruned slices, the reference's zeroed sinks), page-aligned,
    in a private temp folder removed at exit. Pages of a map count in the process's resident set once read;
    `release` gives them back (the page cache keeps them: reading them again costs no I/O). onnxruntime maps
    external data itself when it loads a model by path (and copies it when given values): `session_folder`
    holds hard links to the input's data files beside the spill file, so a session's model file can name them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.folder: str | None = None
        self.spill_fd: int | None = None
        self.spill_path = ""
        self.spill_end = 0
        self.links: dict[str, str | None] = {}
        self.known: set[str] = set()   # every file mapped so far (validated inputs, the spill file)

    def session_folder(self) -> str:
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="spa-weights-")
            atexit.register(shutil.rmtree, self.folder, True)
        return self.folder

    def remove_folder(self) -> None:
        """Remove the temp folder now: an interrupted CLI run ends with os._exit, which runs no atexit hook."""
        if self.folder is not None:
            shutil.rmtree(self.folder, True)

    def linked_name(self, path: str) -> str | None:
        """The name under which `session_folder` holds the file `path` (the spill file, or a hard link to an
        input data file); None where no hard link can be made (another file system)."""
        if path == self.spill_path:
            return os.path.basename(path)
        with self.lock:
            if path not in self.links:
                name = f"input-{len(self.links)}.data"
                try:
                    os.link(path, os.path.join(self.session_folder(), name))
                except OSError:
                    name = None
                self.links[path] = name
            return self.links[path]

    def view(self, t: onnx.TensorProto) -> np.ndarray:
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info.get("offset", "0")), int(info["length"])
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if count * dtype.itemsize != length:
            raise SpaError(f"tensor '{t.name}': {length} bytes of external data, but its dims {list(t.dims)} need "
                           f"{count * dtype.itemsize}")
        if length == 0:
            return np.zeros(tuple(t.dims), dtype)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        if info["location"] == self.spill_path:
            fd, close = self.spill_fd, False
        else:
            fd, close = os.open(info["location"], os.O_RDONLY), True
        try:
            mm = mmap.mmap(fd, length + offset - start, offset=start, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise SpaError(f"tensor '{t.name}': cannot map its external data: {e}")
        finally:
            if close:
                os.close(fd)
        return np.frombuffer(mm, dtype=dtype, count=count, offset=offset - start).reshape(tuple(t.dims))

    def spill(self, t: onnx.TensorProto, value: np.ndarray) -> np.ndarray:
        """Write `value` to the spill file, point `t` at it, and return its mapped (read-only) view."""
        data = np.ascontiguousarray(value)
        with self.lock:
            if self.spill_fd is None:
                self.spill_path = os.path.join(self.session_folder(), "spill.data")
                self.spill_fd = os.open(self.spill_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                self.known.add(self.spill_path)
                self.spill_end = 0
            offset = self.spill_end + (-self.spill_end % mmap.ALLOCATIONGRANULARITY)
            _write_all(self.spill_fd, memoryview(data.reshape(-1)).cast("B"), offset)
            self.spill_end = offset + data.nbytes
        t.ClearField("raw_data")
        for field_name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field_name)
        del t.dims[:]
        t.dims.extend(data.shape)
        t.data_type = onnx.helper.np_dtype_to_tensor_dtype(data.dtype)
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        for key, v in (("location", self.spill_path), ("offset", str(offset)), ("length", str(data.nbytes))):
            e = t.external_data.add()
            e.key, e.value = key, v
        return self.view(t)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data[:1 << 28], offset)
        data, offset = data[n:], offset + n


MAPPED = MappedWeights()


def release(array) -> None:
    """Give back the resident pages of a mapped array (no-op for others): the memory a pass has read through."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if base is not None and not base.closed:
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError, AttributeError):
            pass


def has_subgraph(n: onnx.NodeProto) -> bool:
    """Whether a node carries a subgraph (If/Loop/Scan bodies, or any op with a graph attribute)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) or a.HasField("g") or len(a.graphs)
               for a in n.attribute)


# ---- loading and saving ----------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (with external data) or raise a one-line SpaError."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, RawWeights | None]:
    """Load an ONNX file and locate its initializers' raw bytes in the file buffer, so weights can be viewed
    without a copy (`Graph(model, raw=...)`). Bad files raise a one-line SpaError."""
    p = Path(path)
    if not p.exists():
        raise SpaError(f"input file not found: {p}")
    if p.is_dir():
        raise SpaError(f"input is a directory, not an ONNX file: {p}")
    if p.stat().st_size == 0:
        raise SpaError(f"input file is empty: {p}")
    try:
        buf = p.read_bytes()
        model = onnx.ModelProto()
        model.ParseFromString(buf)
    except Exception as e:  # protobuf DecodeError, an unreadable file, ...
        raise SpaError(f"cannot read {p} as ONNX: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if not model.graph.node:
        raise SpaError(f"{p} has no graph nodes (truncated or not an ONNX model?)")
    # names and wiring, external data from the model's folder only, every tensor's header, onnx.checker
    try:
        raw = RawWeights(buf)
    except (IndexError, ValueError, UnicodeDecodeError):
        raw = None  # an unusual encoding: decode through protobuf instead
    sizes = {name: end - start for name, (start, end) in raw.spans.items()} if raw is not None else None
    external = check_input(model, p.parent, sizes)
    MAPPED.known.update(location for t in model.graph.initializer if is_mapped(t)
                        for location in [next(e.value for e in t.external_data if e.key == "location")])
    return model, (None if external else raw)


class RawWeights:
    """Where each initializer's raw_data lies in the serialized model: a zero-copy view source.

    Walks the protobuf wire format of ModelProto.graph (field 7) → GraphProto.initializer (field 5) →
    TensorProto.name (8) / raw_data (9). Names that appear twice are dropped (protobuf would merge them).
    """

    def __init__(self, buf: bytes):
        self.buf = buf
        self.spans: dict[str, tuple[int, int]] = {}
        seen: set[str] = set()
        for number, start, end in _fields(buf, 0, len(buf)):
            if number != 7:
                continue
            for f2, s2, e2 in _fields(buf, start, end):
                if f2 != 5:
                    continue
                name, span = None, None
                for f3, s3, e3 in _fields(buf, s2, e2):
                    if f3 == 8:
                        name = buf[s3:e3].decode("utf-8")
                    elif f3 == 9:
                        span = (s3, e3)
                if name is None or span is None:
                    continue
                if name in seen:
                    self.spans.pop(name, None)
                    continue
                seen.add(name)
                self.spans[name] = span

    def view(self, t: onnx.TensorProto) -> np.ndarray | None:
        span = self.spans.get(t.name)
        if span is None or t.data_type not in RAW_VIEW_TYPES or sys.byteorder != "little":
            return None
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        count = int(np.prod(t.dims)) if len(t.dims) else 1
        if count * dtype.itemsize != span[1] - span[0]:
            return None
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=span[0]).reshape(tuple(t.dims))


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes, i: int, end: int):
    """(field number, start, end) of every length-delimited field between i and end; others skipped."""
    while i < end:
        tag, i = _varint(buf, i)
        wire = tag & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            yield tag >> 3, i, i + n
            i += n
        else:
            raise ValueError(f"unsupported wire type {wire}")


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> None:
    """Write atomically: temp files in the same folder, then os.replace (the external-data file first). Models
    over ~1.8 GB (protobuf's 2 GB limit) and models whose weights are mapped from files get their weights in
    OUT.data beside OUT, streamed tensor by tensor (`write_external`): no copy of the whole model is made."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    big = (needs_external_data(model) or has_mapped(model)) if external is None else external
    if not big:
        tmp = temp_path_beside(p)
        try:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                tmp.unlink()
        return
    data = p.parent / (p.name + ".data")
    tmp, tmp_data = temp_path_beside(p), temp_path_beside(data)
    try:
        with open(tmp_data, "wb") as f:
            skeleton = write_external(model, f, data.name, min_bytes=0 if external else EXTERNAL_TENSOR_MIN_BYTES)
        with open(tmp, "wb") as f:
            f.write(skeleton.SerializeToString())
        os.replace(tmp_data, data)
        os.replace(tmp, p)
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()


def write_external(model: onnx.ModelProto, f, location: str, min_bytes: int = EXTERNAL_TENSOR_MIN_BYTES
                   ) -> onnx.ModelProto:
    """Stream the model's weights into the open file `f` (the external-data file named `location` beside the
    model) and return the model file's proto: `weightless_copy`'s layout, each tensor written from its value
    (mapped pages given back as they are written) so that at most one tensor's bytes are in memory."""
    skeleton, _ = weightless_copy(model, location, min_bytes)
    offsets = {t.name: int(next(e.value for e in t.external_data if e.key == "offset"))
               for t in skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    written = 0
    for t in model.graph.initializer:
        if t.name not in offsets:
            continue
        f.write(b"\0" * (offsets[t.name] - written))
        written = offsets[t.name] + _tensor_bytes(t)
        if t.data_type in PACKED_4BIT or (not is_mapped(t) and t.data_type not in RAW_VIEW_TYPES):
            f.write(t.raw_data if t.HasField("raw_data") else numpy_helper.from_array(_decode(t)).raw_data)
            continue
        if is_mapped(t) and _copy_mapped(t, f):
            continue
        value = _decode(t)
        flat = np.ascontiguousarray(value).reshape(-1)
        if flat.dtype.byteorder == ">":
            flat = flat.astype(flat.dtype.newbyteorder("<"))
        step = max(1, (64 << 20) // max(flat.itemsize, 1))
        for i in range(0, flat.size, step):
            f.write(memoryview(flat[i:i + step]).cast("B"))
        release(value)
    return skeleton


def _copy_mapped(t: onnx.TensorProto, f) -> bool:
    """Copy a mapped tensor's bytes file to file in the kernel (copy_file_range): they never enter this process.
    False where the system cannot (the caller writes the mapped view instead)."""
    info = {e.key: e.value for e in t.external_data}
    offset, length = int(info.get("offset", "0")), int(info["length"])
    f.flush()
    start = f.tell()
    try:
        with open(info["location"], "rb") as src:
            done = 0
            while done < length:
                n = os.copy_file_range(src.fileno(), f.fileno(), length - done, offset + done, start + done)
                if n <= 0:
                    raise OSError("copy_file_range copied nothing")
                done += n
    except (OSError, AttributeError):
        f.seek(start)
        f.truncate()
        return False
    f.seek(start + length)
    return True


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model is too large for one protobuf file (2 GB; 1.8 GB of weights leaves room for the rest)."""
    return _approx_size(model) > EXTERNAL_DATA_BYTES


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether initializers refer to an external-data file instead of holding their bytes."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def weightless_copy(model: onnx.ModelProto, location: str, min_bytes: int = EXTERNAL_TENSOR_MIN_BYTES
                    ) -> tuple[onnx.ModelProto, int]:
    """The model as `save_model` writes it past 2 GB, without copying a weight byte: initializers of at least
    EXTERNAL_TENSOR_MIN_BYTES (and those already external) refer to `location`, one after another; smaller ones
    are copied. Returns the copy and the length its data file must have."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    offset = 0
    for t in model.graph.initializer:
        n = _tensor_bytes(t)
        if n is None or (n < min_bytes and t.data_location != onnx.TensorProto.EXTERNAL):
            copy.graph.initializer.add().CopyFrom(t)
            continue
        if n >= EXTERNAL_ALIGN_BYTES:
            offset += -offset % EXTERNAL_ALIGN_BYTES  # onnxruntime maps page-aligned data instead of copying it
        h = copy.graph.initializer.add()
        h.name, h.data_type, h.data_location = t.name, t.data_type, onnx.TensorProto.EXTERNAL
        h.dims.extend(t.dims)
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(n))):
            entry = h.external_data.add()
            entry.key, entry.value = key, value
        offset += n
    return copy, offset


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if isinstance(value, Message):
            getattr(dst, fd.name).CopyFrom(value)
        elif hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        else:
            setattr(dst, fd.name, value)


def _tensor_bytes(t: onnx.TensorProto) -> int | None:
    """The bytes of a tensor's data as an external-data file holds them; None for strings (never external)."""
    if t.data_type == onnx.TensorProto.STRING:
        return None
    length = next((e.value for e in t.external_data if e.key == "length"), None)
    if t.data_location == onnx.TensorProto.EXTERNAL and length is not None:
        return int(length)
    return _data_bytes(t)


def _approx_size(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in the model (cheap: from the dims, no copy of a tensor's bytes)."""
    return sum(_data_bytes(t) for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)


PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _data_bytes(t: onnx.TensorProto) -> int:
    """A tensor's data size from its dims and type: reading raw_data would copy it (1.4 s for 720 MB)."""
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(x) for x in t.string_data)
    count = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in PACKED_4BIT:
        return (count + 1) // 2
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):  # a type numpy has no dtype for: measure the bytes themselves
        return len(t.raw_data)


def static_dims(vi: onnx.ValueInfoProto) -> tuple | None:
    """Declared dims: ints where static, the dim_param (or None) where dynamic. A negative dim_value is how some
    exporters (Paddle) write a dynamic dim: it is dynamic here too, never a size."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                 for d in t.shape.dim)
