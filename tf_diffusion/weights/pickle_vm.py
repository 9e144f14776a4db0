"""A small pickle interpreter that builds only what its caller allows.

CPython's ``pickle.Unpickler`` trusts the data it reads in ways an allow-list
cannot undo: it grows its memo to the largest index a file names (a 9-byte
pickle asks for gigabytes), resolves ``EXT`` codes through ``copyreg`` without
``find_class``, and applies ``BUILD`` to any object, reaching C ``__setstate__``
methods that trust their input. This interpreter walks the opcodes that
``pickletools.genops`` (the stdlib's opcode parser, which allocates only what
the bytes hold) yields and gives every decision to a policy:

- globals (``GLOBAL``, ``STACK_GLOBAL``, ``INST``) go to ``policy.find_class``;
- calls (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``INST``, ``OBJ``) to ``policy.call``;
- ``BUILD`` to ``policy.build``;
- persistent ids to ``policy.persistent_load``;
- every dict key and set item to ``policy.check_key`` before it is hashed
  (hashing a deeply nested tuple overflows the C stack; crafted integers
  collide and make dicts quadratic).

Containers are only the built-in ones: ``APPEND`` needs a list, ``SETITEM`` a
dict, ``ADDITEMS`` a set (CPython would call any object's methods). The memo is
a dict keyed by the index the file names, bounded to 32 bits. Refused outright:
``EXT1/2/4`` (copyreg extension codes), ``NEXT_BUFFER`` / ``READONLY_BUFFER``
(out-of-band buffers), protocols above 5, and a frame or string that claims
more bytes than the pickle holds.
"""

from __future__ import annotations

import pickletools
from typing import Any, Protocol

HIGHEST_PROTOCOL = 5
# Memo indices: LONG_BINPUT's 4-byte range; a protocol-0 PUT can name any integer.
MAX_MEMO_INDEX = 2**32 - 1


class PickleRefused(ValueError):
    """The pickle asks for something the interpreter never does (an EXT code, an out-of-band buffer)."""


class Policy(Protocol):
    """What a caller decides for the interpreter; each method raises to refuse."""

    def find_class(self, module: str, name: str) -> Any: ...

    def call(self, func: Any, args: tuple, kwargs: dict, opcode: str) -> Any: ...

    def build(self, obj: Any, state: Any) -> None: ...

    def persistent_load(self, pid: Any) -> Any: ...

    def check_key(self, key: Any) -> None: ...


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


def _utf8(text: str) -> str:
    # Python-2 STRING opcodes: genops decodes them as latin-1 (or ascii); torch.load reads them as UTF-8.
    return text.encode("latin-1").decode("utf-8")


class _Machine:
    """One run over one pickle: the stack, the marks and the memo."""

    def __init__(self, policy: Policy, size: int | None, passthrough: tuple[type, ...]):
        self.policy, self.size, self.passthrough = policy, size, passthrough
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}

    # --- stack helpers -----------------------------------------------------------------------

    def _floor(self) -> int:
        return self.marks[-1] if self.marks else 0

    def pop(self) -> Any:
        if len(self.stack) <= self._floor():
            raise ValueError("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if len(self.stack) <= self._floor():
            raise ValueError("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise ValueError("no MARK on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def _keys(self, keys) -> None:
        for key in keys:
            self.policy.check_key(key)

    def _memo_index(self, index) -> int:
        if type(index) is not int or not 0 <= index <= MAX_MEMO_INDEX:
            raise ValueError(f"memo index must be an int in [0, {MAX_MEMO_INDEX}], got {_short(index)}")
        return index

    # --- the loop ------------------------------------------------------------------------------

    def run(self, file) -> Any:
        for opcode, arg, pos in pickletools.genops(file):
            handler = _HANDLERS.get(opcode.name)
            try:
                if handler is None:
                    raise PickleRefused(f"opcode {opcode.name} is not supported")
                handler(self, arg, pos)
            except _Stop as stop:
                return stop.value
            except PickleRefused as e:
                raise PickleRefused(f"at byte {pos}, {opcode.name}: {e}") from None
            except self.passthrough:
                raise
            except Exception as e:  # the policy and the builders refuse with ValueError/TypeError
                raise ValueError(f"at byte {pos}, {opcode.name}: {type(e).__name__}: {e}") from None
        raise ValueError("pickle exhausted before STOP")  # genops raises first; kept for clarity


def _short(value, limit: int = 80) -> str:
    """A repr for messages that never recurses deeply nor prints huge ints in full."""
    if type(value) is int:
        return f"an int of {value.bit_length()} bits" if value.bit_length() > 64 else str(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} items"
    try:
        text = repr(value)
    except Exception:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- opcode handlers: (machine, arg, pos) ------------------------------------------------------


def _push_arg(m, arg, pos):
    m.stack.append(arg)


def _push_str8(m, arg, pos):
    m.stack.append(_utf8(arg))


def _proto(m, arg, pos):
    if not 0 <= arg <= HIGHEST_PROTOCOL:
        raise ValueError(f"unsupported pickle protocol {arg}")


def _frame(m, arg, pos):
    # genops does not read a frame's bytes; refuse one that claims more than the pickle holds.
    if m.size is not None and pos + 9 + arg > m.size:
        raise ValueError(f"frame of {arg} bytes runs past the end of the pickle ({m.size} bytes)")


def _stop(m, arg, pos):
    raise _Stop(m.pop())


def _mark(m, arg, pos):
    m.marks.append(len(m.stack))


def _pop(m, arg, pos):
    # As pickle.py: POP with nothing above the last mark discards the mark.
    if len(m.stack) > m._floor():
        m.stack.pop()
    else:
        m.pop_mark()


def _pop_mark(m, arg, pos):
    m.pop_mark()


def _dup(m, arg, pos):
    m.stack.append(m.top())


def _const(value):
    def handler(m, arg, pos):
        m.stack.append(value)

    return handler


def _new(factory):
    def handler(m, arg, pos):
        m.stack.append(factory())

    return handler


def _bytearray(m, arg, pos):
    m.stack.append(bytearray(arg))


def _list(m, arg, pos):
    m.stack.append(m.pop_mark())


def _tuple(m, arg, pos):
    m.stack.append(tuple(m.pop_mark()))


def _tuple_n(n):
    def handler(m, arg, pos):
        if len(m.stack) - m._floor() < n:
            raise ValueError("stack underflow")
        items = tuple(m.stack[len(m.stack) - n :])
        del m.stack[len(m.stack) - n :]
        m.stack.append(items)

    return handler


def _pairs(m, items) -> list[tuple[Any, Any]]:
    if len(items) % 2:
        raise ValueError(f"odd number of items ({len(items)}) for key/value pairs")
    keys = items[0::2]
    m._keys(keys)
    return list(zip(keys, items[1::2], strict=True))


def _dict(m, arg, pos):
    m.stack.append(dict(_pairs(m, m.pop_mark())))


def _target(m, kinds, what):
    target = m.top()
    if not isinstance(target, kinds):
        raise ValueError(f"{what} needs a {kinds[0].__name__} below it, found {_short(target)}")
    return target


def _append(m, arg, pos):
    value = m.pop()
    _target(m, (list,), "APPEND").append(value)


def _appends(m, arg, pos):
    items = m.pop_mark()
    _target(m, (list,), "APPENDS").extend(items)


def _setitem(m, arg, pos):
    value, key = m.pop(), m.pop()
    target = _target(m, (dict,), "SETITEM")
    m.policy.check_key(key)
    target[key] = value


def _setitems(m, arg, pos):
    pairs = _pairs(m, m.pop_mark())
    _target(m, (dict,), "SETITEMS").update(pairs)


def _additems(m, arg, pos):
    items = m.pop_mark()
    target = _target(m, (set,), "ADDITEMS")
    m._keys(items)
    target.update(items)


def _frozenset(m, arg, pos):
    items = m.pop_mark()
    m._keys(items)
    m.stack.append(frozenset(items))


def _get(m, arg, pos):
    index = m._memo_index(arg)
    if index not in m.memo:
        raise ValueError(f"memo index {index} was never stored (PUT)")
    m.stack.append(m.memo[index])


def _put(m, arg, pos):
    m.memo[m._memo_index(arg)] = m.top()


def _memoize(m, arg, pos):
    m.memo[len(m.memo)] = m.top()


def _refuse(why):
    def handler(m, arg, pos):
        raise PickleRefused(why)

    return handler


def _global(m, arg, pos):
    module, _, name = arg.partition(" ")
    m.stack.append(m.policy.find_class(module, name))


def _stack_global(m, arg, pos):
    name, module = m.pop(), m.pop()
    if type(module) is not str or type(name) is not str:
        raise ValueError(f"STACK_GLOBAL needs two strings, got {_short(module)}, {_short(name)}")
    m.stack.append(m.policy.find_class(module, name))


def _reduce(m, arg, pos):
    args = m.pop()
    func = m.pop()
    if type(args) is not tuple:
        raise ValueError(f"REDUCE arguments must be a tuple, got {_short(args)}")
    m.stack.append(m.policy.call(func, args, {}, "REDUCE"))


def _newobj(m, arg, pos):
    args = m.pop()
    cls = m.pop()
    if type(args) is not tuple:
        raise ValueError(f"NEWOBJ arguments must be a tuple, got {_short(args)}")
    m.stack.append(m.policy.call(cls, args, {}, "NEWOBJ"))


def _newobj_ex(m, arg, pos):
    kwargs, args, cls = m.pop(), m.pop(), m.pop()
    if type(args) is not tuple or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
        raise ValueError(
            f"NEWOBJ_EX needs a tuple and a dict of str keys, got {_short(args)}, {_short(kwargs)}"
        )
    m.stack.append(m.policy.call(cls, args, kwargs, "NEWOBJ_EX"))


def _inst(m, arg, pos):
    module, _, name = arg.partition(" ")
    cls = m.policy.find_class(module, name)
    m.stack.append(m.policy.call(cls, tuple(m.pop_mark()), {}, "INST"))


def _obj(m, arg, pos):
    items = m.pop_mark()
    if not items:
        raise ValueError("OBJ needs a class after its MARK")
    m.stack.append(m.policy.call(items[0], tuple(items[1:]), {}, "OBJ"))


def _build(m, arg, pos):
    state = m.pop()
    m.policy.build(m.top(), state)


def _persid(m, arg, pos):
    m.stack.append(m.policy.persistent_load(arg))


def _binpersid(m, arg, pos):
    m.stack.append(m.policy.persistent_load(m.pop()))


_HANDLERS = {
    "PROTO": _proto,
    "FRAME": _frame,
    "STOP": _stop,
    "MARK": _mark,
    "POP": _pop,
    "POP_MARK": _pop_mark,
    "DUP": _dup,
    "INT": _push_arg,  # genops gives True/False for protocol 0's "01"/"00", as pickle does
    "BININT": _push_arg,
    "BININT1": _push_arg,
    "BININT2": _push_arg,
    "LONG": _push_arg,
    "LONG1": _push_arg,
    "LONG4": _push_arg,
    "FLOAT": _push_arg,
    "BINFLOAT": _push_arg,
    "STRING": _push_str8,
    "BINSTRING": _push_str8,
    "SHORT_BINSTRING": _push_str8,
    "BINBYTES": _push_arg,
    "SHORT_BINBYTES": _push_arg,
    "BINBYTES8": _push_arg,
    "BYTEARRAY8": _bytearray,
    "UNICODE": _push_arg,
    "SHORT_BINUNICODE": _push_arg,
    "BINUNICODE": _push_arg,
    "BINUNICODE8": _push_arg,
    "NONE": _const(None),
    "NEWTRUE": _const(True),
    "NEWFALSE": _const(False),
    "EMPTY_LIST": _new(list),
    "EMPTY_TUPLE": _const(()),
    "EMPTY_DICT": _new(dict),
    "EMPTY_SET": _new(set),
    "LIST": _list,
    "TUPLE": _tuple,
    "TUPLE1": _tuple_n(1),
    "TUPLE2": _tuple_n(2),
    "TUPLE3": _tuple_n(3),
    "DICT": _dict,
    "APPEND": _append,
    "APPENDS": _appends,
    "SETITEM": _setitem,
    "SETITEMS": _setitems,
    "ADDITEMS": _additems,
    "FROZENSET": _frozenset,
    "GET": _get,
    "BINGET": _get,
    "LONG_BINGET": _get,
    "PUT": _put,
    "BINPUT": _put,
    "LONG_BINPUT": _put,
    "MEMOIZE": _memoize,
    "GLOBAL": _global,
    "STACK_GLOBAL": _stack_global,
    "REDUCE": _reduce,
    "NEWOBJ": _newobj,
    "NEWOBJ_EX": _newobj_ex,
    "INST": _inst,
    "OBJ": _obj,
    "BUILD": _build,
    "PERSID": _persid,
    "BINPERSID": _binpersid,
    "EXT1": _refuse("copyreg extension codes are refused (they bypass the allow-list)"),
    "EXT2": _refuse("copyreg extension codes are refused (they bypass the allow-list)"),
    "EXT4": _refuse("copyreg extension codes are refused (they bypass the allow-list)"),
    "NEXT_BUFFER": _refuse("out-of-band buffers are not supported"),
    "READONLY_BUFFER": _refuse("out-of-band buffers are not supported"),
}


def unpickle(file, policy: Policy, *, size: int | None = None, passthrough: tuple[type, ...] = ()) -> Any:
    """Run one pickle from ``file`` (bytes or a binary file positioned at its start) under ``policy``.

    Args:
        file: the pickle's bytes, or a binary file object whose ``read(n)``
            returns at most what is left (``io.BytesIO``, ``mmap.mmap``) and
            which is left just after the pickle's STOP.
        policy: decides every global, call, BUILD, persistent id and key.
        size: the end offset of the pickle within ``file``, to check frame sizes.
        passthrough: exception types the policy raises that must leave unchanged.

    Returns:
        The unpickled object.

    Raises:
        PickleRefused: an opcode that is never allowed (EXT codes, out-of-band buffers).
        ValueError: a malformed pickle (message: byte offset, opcode, what is wrong);
            exceptions of the ``passthrough`` types as the policy raised them.
    """
    machine = _Machine(policy, size, passthrough)
    try:
        return machine.run(file)
    except (PickleRefused, *passthrough):
        raise
    except ValueError:
        raise
    except Exception as e:  # genops' own reader errors beyond ValueError (struct, unicode) end here
        raise ValueError(f"{type(e).__name__}: {e}") from None
