"""The allowlists of the handler scan: modules, their names, builtins, syntax, value attributes.

Everything here is an allowlist, decided on purpose; `supply/scan.py` refuses whatever is not
on it. A module is importable only if it is listed, and only the names listed for it may be
used; for `torch` those are the side-effect-free operations of `serving/opsallow.py` plus a
short list of classes and dtypes. Builtins are listed the same way (no `eval`, `open`, `type`).

Attributes of VALUES (`self.model.x`, `tensor.x`) cannot be typed statically, so the rule is
derived from the types handler code can reach: every public attribute of `torch.Tensor` that is
not an allowed operation or a plain accessor, and each name that writes files, loads native
code or exposes raw memory on an ndarray, a module, a PIL image, a storage, a logger or a file
object, is refused on every value, whatever its type. Names that no reachable type has are the
archive's own (its classes and attributes) and are allowed.
"""

from __future__ import annotations

import ast
import builtins
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

__all__ = [
    "ALLOWED_BUILTINS",
    "ALLOWED_DUNDER_DEFS",
    "ALLOWED_DUNDER_NAMES",
    "ALLOWED_NODES",
    "TYPE_ONLY",
    "ATTRIBUTE_CALL_BUILTINS",
    "CALL_ARITY",
    "CALL_WITHOUT_UPDATE",
    "FIX",
    "FRAME_PREFIXES",
    "MODULES",
    "ModuleSpec",
    "allowed_module_names",
    "evaluates_annotations",
    "is_dunder",
    "refused_value_attributes",
    "torch_name_allowed",
]


@dataclass(frozen=True)
class ModuleSpec:
    """An importable module: the names it may give, and its importable submodules."""

    names: frozenset[str] = frozenset()
    submodules: frozenset[str] = frozenset()
    #: Decides names beyond `names` (torch: the operation allowlist); None means no more.
    extra: Callable[[str], bool] | None = field(default=None, compare=False)
    #: Every public name of the module is allowed (pure modules such as math, itertools).
    all_public: bool = False


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: torch names that are not operations: classes, dtypes, grad modes, tensor constructors.
_TORCH_NAMES = _names("""
    Tensor Size device dtype finfo iinfo no_grad inference_mode enable_grad is_grad_enabled
    is_tensor tensor as_tensor from_numpy get_default_dtype
    float float16 float32 float64 half double bfloat16 complex64 complex128 cfloat cdouble
    int int8 int16 int32 int64 short long uint8 bool
""")
_NN_NAMES = _names("""
    Module Sequential ModuleList ModuleDict Identity Linear Conv2d ReLU GELU Softmax Sigmoid
    Tanh Dropout Flatten LayerNorm BatchNorm1d BatchNorm2d Embedding Parameter
""")
_FUNCTIONAL_NAMES = _names("""
    relu relu6 gelu silu elu leaky_relu hardtanh sigmoid tanh softplus softmax log_softmax
    normalize pad interpolate one_hot linear conv1d conv2d avg_pool1d avg_pool2d max_pool1d
    max_pool2d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool2d layer_norm
    batch_norm group_norm dropout embedding cosine_similarity pairwise_distance grid_sample
    affine_grid pixel_shuffle unfold fold cross_entropy nll_loss mse_loss
""")
_NUMPY_NAMES = _names("""
    ndarray array asarray ascontiguousarray zeros zeros_like ones ones_like full full_like
    empty arange linspace frombuffer stack concatenate hstack vstack expand_dims squeeze
    reshape transpose clip where argmax argmin argsort sort max min sum mean std var prod
    cumsum exp log log1p sqrt abs round floor ceil maximum minimum isfinite isnan isinf
    allclose array_equal unique dot matmul einsum pad flip
    float16 float32 float64 int8 int16 int32 int64 uint8 bool_ dtype newaxis pi e inf nan
""")
_TYPING_NAMES = _names("""
    Any Optional Union List Dict Tuple Set FrozenSet Sequence Mapping MutableMapping Iterable
    Iterator Callable Literal Final ClassVar cast TYPE_CHECKING overload Annotated
""")  # not TypeVar, NamedTuple, TypedDict, get_type_hints: they carry or evaluate strings
_OPERATOR_NAMES = _names("""
    itemgetter add sub mul truediv floordiv mod neg pos abs eq ne lt le gt ge and_ or_ xor
    not_ truth contains getitem index
""")
_LOGGING_NAMES = _names("getLogger Logger LoggerAdapter DEBUG INFO WARNING ERROR CRITICAL NOTSET")

#: Classes a handler may name only as a type (a function annotation, or the classes argument
#: of isinstance/issubclass), never call or hold: `numpy.ndarray(shape, object, buffer)`
#: reads object POINTERS from bytes the caller wrote, so `id(divmod) + 80` packed into a
#: bytearray comes back as `eval`.
TYPE_ONLY: frozenset[str] = frozenset({"numpy.ndarray"})

#: Importable modules. `secure_handler` is filled in from its `__all__` (its public API).
MODULES: dict[str, ModuleSpec] = {
    "__future__": ModuleSpec(_names("annotations")),
    "abc": ModuleSpec(_names("ABC ABCMeta abstractmethod")),
    "base64": ModuleSpec(_names(
        "b64encode b64decode urlsafe_b64encode urlsafe_b64decode standard_b64encode "
        "standard_b64decode")),
    "bisect": ModuleSpec(all_public=True),
    "collections": ModuleSpec(
        _names("OrderedDict defaultdict deque Counter namedtuple ChainMap"), _names("abc")),
    "collections.abc": ModuleSpec(all_public=True),
    "contextlib": ModuleSpec(_names("contextmanager suppress nullcontext ExitStack")),
    "copy": ModuleSpec(_names("copy deepcopy")),
    "dataclasses": ModuleSpec(_names(
        "dataclass field fields asdict astuple replace is_dataclass FrozenInstanceError "
        "InitVar KW_ONLY MISSING")),
    "enum": ModuleSpec(_names("Enum IntEnum StrEnum Flag IntFlag auto unique")),
    "functools": ModuleSpec(_names(
        "lru_cache cache cached_property partial partialmethod reduce wraps total_ordering "
        "cmp_to_key")),  # not singledispatch: `register` evaluates annotation strings
    "hashlib": ModuleSpec(_names("sha256 sha512 sha1 md5 blake2b blake2s")),
    "heapq": ModuleSpec(all_public=True),
    "itertools": ModuleSpec(all_public=True),
    "json": ModuleSpec(_names("loads dumps JSONDecodeError")),
    "logging": ModuleSpec(_LOGGING_NAMES),
    "math": ModuleSpec(all_public=True),
    "numbers": ModuleSpec(all_public=True),
    "numpy": ModuleSpec(_NUMPY_NAMES),
    "operator": ModuleSpec(_OPERATOR_NAMES),
    "re": ModuleSpec(_names(
        "compile match search fullmatch findall finditer sub subn split escape Pattern Match "
        "error IGNORECASE I MULTILINE M DOTALL S ASCII A VERBOSE X UNICODE U")),
    "statistics": ModuleSpec(_names("mean median mode stdev variance fmean")),
    "string": ModuleSpec(_names(
        "ascii_letters ascii_lowercase ascii_uppercase digits hexdigits octdigits punctuation "
        "printable whitespace")),
    "struct": ModuleSpec(_names("pack unpack unpack_from calcsize iter_unpack error Struct")),
    "time": ModuleSpec(_names("perf_counter perf_counter_ns monotonic monotonic_ns time")),
    "torch": ModuleSpec(_TORCH_NAMES, _names("nn"), extra=lambda n: torch_name_allowed(n)),
    "torch.nn": ModuleSpec(_NN_NAMES, _names("functional")),
    "torch.nn.functional": ModuleSpec(_FUNCTIONAL_NAMES),
    "typing": ModuleSpec(_TYPING_NAMES),
    "unicodedata": ModuleSpec(_names(
        "normalize category combining east_asian_width is_normalized decimal digit numeric "
        "bidirectional mirrored name")),
}


def torch_name_allowed(name: str) -> bool:
    """`torch.NAME` / `tensor.NAME`: allowed iff `aten::NAME` is a side-effect-free operation.

    An in-place variant (`add_`) is allowed when its out-of-place operation is. A name that
    is a MODULE of torch (`torch.cuda`, `torch.random`, `torch.cpu` share names with
    operations) is not: a module reached as a value would escape the module allowlist.
    """
    from secure_handler.serving.opsallow import is_allowed_op

    if name.startswith("_") or name in _torch_modules():
        return False
    return is_allowed_op(f"aten::{name}") or (
        name.endswith("_") and is_allowed_op(f"aten::{name[:-1]}")
    )


@functools.lru_cache(maxsize=1)
def _torch_modules() -> frozenset[str]:
    import torch

    return frozenset(n for n in dir(torch) if isinstance(getattr(torch, n, None), ModuleType))


@functools.lru_cache(maxsize=1)
def allowed_module_names() -> dict[str, ModuleSpec]:
    """MODULES with `secure_handler` (its public `__all__`) and `all_public` names filled in."""
    import importlib

    import secure_handler

    specs = dict(MODULES)
    public = frozenset(n for n in secure_handler.__all__ if not n.startswith("_"))
    specs["secure_handler"] = ModuleSpec(public)
    for name, spec in MODULES.items():
        if spec.all_public:
            module = importlib.import_module(name)
            names = frozenset(
                n
                for n in dir(module)
                if not n.startswith("_") and not isinstance(getattr(module, n), ModuleType)
            )
            specs[name] = ModuleSpec(names, spec.submodules)
    return specs


@functools.lru_cache(maxsize=256)
def evaluates_annotations(qualified: str) -> bool:
    """True for an allowed class whose subclasses have their annotations EVALUATED (pydantic
    models: a string annotation, or a string inside `list["..."]`, runs as code)."""
    import importlib

    from pydantic import BaseModel

    module, _, name = qualified.rpartition(".")
    if module not in allowed_module_names():
        return False
    value = getattr(importlib.import_module(module), name, None)
    return isinstance(value, type) and issubclass(value, BaseModel)


# --- builtins ----------------------------------------------------------------------------

#: Exception classes; not SystemExit, KeyboardInterrupt or GeneratorExit (BaseException only),
#: which no handler needs and which end a worker instead of failing a row.
_EXCEPTIONS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, Exception)
)
#: Builtins handler code may name. Not: eval exec compile __import__ open input breakpoint
#: globals locals vars dir help memoryview type exit quit (code, files, reflection, processes),
#: nor id (an object's address is what a fake-object attack on the interpreter starts from).
ALLOWED_BUILTINS: frozenset[str] = _names("""
    abs all any ascii bin bool bytearray bytes callable chr classmethod complex dict divmod
    enumerate filter float format frozenset hash hex int isinstance issubclass iter len
    list map max min next object oct ord pow print property range repr reversed round set
    slice sorted staticmethod str sum super tuple zip Ellipsis NotImplemented
""") | _EXCEPTIONS
#: Builtins allowed only as `getattr(obj, "literal")`: the literal is judged as `obj.literal`.
ATTRIBUTE_CALL_BUILTINS: frozenset[str] = _names("getattr hasattr setattr delattr")
#: Dunder names a module may use as plain names.
ALLOWED_DUNDER_NAMES: frozenset[str] = _names("__name__ __all__ __slots__")
#: Special methods a class may define (and reach through `super()`); others (`__getattr__`,
#: `__getattribute__`, `__init_subclass__`, `__reduce__`...) change how the library's own
#: code sees the object, so they are refused.
ALLOWED_DUNDER_DEFS: frozenset[str] = _names("""
    __init__ __post_init__ __repr__ __str__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__
    __hash__ __len__ __iter__ __next__ __getitem__ __contains__ __call__ __enter__ __exit__
    __bool__
""")
#: Attributes of frames, tracebacks, generators, coroutines and code objects: each reaches
#: `f_builtins`/`f_globals` (every function of the process) without a dunder.
FRAME_PREFIXES = ("f_", "gi_", "co_", "tb_", "cr_", "ag_")

#: The fix each scan rule's findings print.
FIX = {
    "SH002": "save the file as UTF-8 and delete the coding declaration",
    "SH003": "write it with plain statements, or move it into a reviewed package installed "
    "in the image",
    "SH110": "move this into a reviewed package installed in the image",
    "SH111": "use a listed name, or move this into a reviewed package installed in the image",
    "SH112": "import the names you use",
    "SH113": "import the archive's modules by their absolute name",
    "SH114": "use a module only as `module.name`, and give other values their own names",
    "SH210": "do it in a reviewed package installed in the image",
    "SH211": "use public names (attributes and methods without a leading underscore)",
    "SH212": "do it outside the worker, or in a reviewed package installed in the image",
    "SH213": "write the attribute name literally (`obj.name`)",
    "SH214": "subclass an imported class or a class defined here, by its name",
}


# --- syntax ------------------------------------------------------------------------------

#: AST node types the scanner understands. Not listed, so refused: async/await, `match`
#: (class patterns read attributes by name), `global`/`nonlocal`, `try/except*`.
ALLOWED_NODES: frozenset[type[ast.AST]] = frozenset({
    ast.Module, ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.If,
    ast.For, ast.While, ast.Break, ast.Continue, ast.Pass, ast.FunctionDef, ast.ClassDef,
    ast.Import, ast.ImportFrom, ast.alias, ast.Raise, ast.Try, ast.ExceptHandler, ast.With,
    ast.withitem, ast.Assert, ast.Delete, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Lambda,
    ast.IfExp, ast.Dict, ast.Set, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
    ast.comprehension, ast.Compare, ast.Call, ast.keyword, ast.FormattedValue, ast.JoinedStr,
    ast.Constant, ast.Attribute, ast.Subscript, ast.Starred, ast.Name, ast.List, ast.Tuple,
    ast.Slice, ast.NamedExpr, ast.arguments, ast.arg, ast.Yield, ast.YieldFrom,
    ast.Load, ast.Store, ast.Del,
    ast.And, ast.Or, ast.Add, ast.Sub, ast.Mult, ast.MatMult, ast.Div, ast.Mod, ast.Pow,
    ast.LShift, ast.RShift, ast.BitOr, ast.BitXor, ast.BitAnd, ast.FloorDiv, ast.Invert,
    ast.Not, ast.UAdd, ast.USub, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Is,
    ast.IsNot, ast.In, ast.NotIn,
})  # fmt: skip

# --- attributes of values ----------------------------------------------------------------

#: Tensor attributes that are plain accessors or conversions, not operations.
_TENSOR_ACCESSORS = _names("""
    shape dtype device ndim T mT H mH data grad is_cuda is_leaf requires_grad layout names
    nbytes itemsize tolist item numpy size dim numel nelement element_size is_contiguous
    is_floating_point is_complex float double half bfloat16 long int short char byte bool
    cpu cuda to type type_as contiguous clone detach view view_as reshape reshape_as expand
    expand_as new_zeros new_ones new_full new_empty new_tensor stride storage_offset
    get_device requires_grad_ unique unique_consecutive norm unflatten split real imag name new
    ndimension cfloat cdouble
""")
#: Per reachable type, the public attributes that write files, load code, compile or run
#: code, expose raw memory, or navigate to such objects.
_UNSAFE_BY_TYPE: dict[str, frozenset[str]] = {
    "numpy.ndarray": _names("tofile dump dumps ctypes setflags"),
    "torch.nn.Module": _names("save save_to_buffer define share_memory compile"),
    "torch.UntypedStorage": _names("from_file from_buffer share_memory_ data_ptr filename"),
    "PIL.Image.Image": _names("save show im fp filename"),
    "io.FileIO": _names("write writelines truncate fileno buffer raw reconfigure"),
    "logging.Logger": _names("""addHandler removeHandler handlers manager root parent
                              callHandlers makeRecord addFilter removeFilter filters
                              findCaller disabled"""),
    "str": _names("format format_map"),  # "{0.__globals__}".format(f) reads any attribute
    "ts.context.Context": _names("cl_socket"),  # the worker's socket to the frontend (async mode)
    # A class's method resolution order reaches bases the allowlist never names (TorchServe's
    # BaseHandler, whose `initialize` runs torch.load/torch.jit.load/dlopen on a given path).
    "type": _names("mro"),
    # The object whose attribute lookup failed: inside library code, possibly a module, and a
    # module held as a value gives every function it imported (`m.serialization.os.system`).
    "AttributeError": _names("obj"),
}
#: The pydantic model API a handler may use on the library's limits: data in, data out.
#: Every other public name of `BaseModel` is refused on any value, whatever pydantic adds:
#: `parse_raw(b, proto="pickle", allow_pickle=True)` unpickles, `parse_file` reads files,
#: `model_rebuild`/`update_forward_refs` evaluate annotations in a namespace the caller gives.
_PYDANTIC_DATA = _names("""
    construct copy dict from_orm json model_computed_fields model_config model_construct
    model_copy model_dump model_dump_json model_extra model_fields model_fields_set
    model_json_schema model_parametrized_name model_validate model_validate_json
    model_validate_strings parse_obj schema schema_json validate
""")
#: Methods allowed only when called right where they are named, without `update=` or `**`:
#: pydantic's `copy(update=...)`/`model_copy(update=...)` write ANY key into the copy's
#: `__dict__`, and numpy reads `__array_interface__` from an instance's own attributes, so an
#: update naming it (`"typestr": "|O"`, `"data": (address, False)`) reads or writes any memory.
#: `dict.copy()`, `ndarray.copy()` and the like are unaffected.
CALL_WITHOUT_UPDATE: frozenset[str] = frozenset({"copy", "model_copy"})
#: Functions allowed only when called in place with at most this many positional arguments:
#: `functools.wraps(src, assigned=names)` copies attributes the CALLER names, so
#: `("__array_interface__",)` from a temporary array leaves a view of freed memory.
CALL_ARITY: dict[str, int] = {"functools.wraps": 1}
#: Public names of TorchScript modules, methods and functions that are plain data.
_SCRIPT_DATA = _names("code name schema qualified_name original_name")


@functools.lru_cache(maxsize=1)
def refused_value_attributes() -> frozenset[str]:
    """Attribute names refused on any value: the unsafe names of every reachable type.

    Tensor names are derived: each public attribute of `torch.Tensor` that is neither an
    allowed operation nor a listed accessor (`storage`, `untyped_storage`, `data_ptr`,
    `share_memory_`, `register_hook`...).
    """
    import torch

    tensor = {
        name
        for name in dir(torch.Tensor)
        if not name.startswith(("_", "is_"))  # is_cuda, is_sparse...: flags
        and name not in _TENSOR_ACCESSORS
        and not torch_name_allowed(name)
    }
    unsafe = set().union(*_UNSAFE_BY_TYPE.values())
    from pydantic import BaseModel

    pydantic = {n for n in dir(BaseModel) if not n.startswith("_")} - _PYDANTIC_DATA
    return frozenset(tensor | unsafe | pydantic | _torchscript_internals())


def _torchscript_internals() -> set[str]:
    """Public names a loaded TorchScript model has beyond `torch.nn.Module`'s own API.

    Derived, not listed: `graph`, `inlined_graph`, `owner`, `define`, `save`... each reaches
    the compiler's IR, which a handler can edit in place (insert an `aten::save` node into
    `forward`'s graph) so that the next call writes files; no one needs them to serve.
    """
    import torch
    from torch.jit._script import RecursiveScriptModule, ScriptFunction

    kinds = (RecursiveScriptModule, ScriptFunction, torch._C.ScriptModule, torch._C.ScriptMethod,
             torch._C.ScriptObject)  # fmt: skip
    module_api = {n for n in dir(torch.nn.Module) if not n.startswith("_")}
    names = {n for kind in kinds for n in dir(kind) if not n.startswith("_")}
    return names - module_api - _SCRIPT_DATA


def is_dunder(name: str) -> bool:
    """`__x__`: a special name."""
    return len(name) > 4 and name.startswith("__") and name.endswith("__")
