"""Go value semantics for the template renderer: truth, `fmt` printing, `encoding/json` output, comparison.

Template data is plain Python: `dict` is a Go `map[string]any` (a missing key reads as nil), `GoStruct` a Go struct
(a missing field is an execution error, as in Go), lists are slices, `None` is nil.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


@dataclass
class GoStruct:
    """A Go struct value: `fields` by Go name (`Role`, `Content`), `json` what `encoding/json` would write,
    `text` what its String() method returns (None: printed as `{v1 v2 ...}`)."""

    type_name: str
    fields: dict[str, Any]
    json: Any = None
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def type_name(v: Any) -> str:
    if v is None:
        return "<nil>"
    if isinstance(v, GoStruct):
        return v.type_name
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list | tuple):
        return "[]interface {}"
    if isinstance(v, dict):
        return "map[string]interface {}"
    return type(v).__name__


def truth(v: Any) -> bool:
    """Go's template truth: false, 0, nil, and empty strings/slices/maps are false; structs are always true."""
    if v is None:
        return False
    if isinstance(v, GoStruct):
        return True
    if isinstance(v, bool | int | float | str | list | tuple | dict):
        return bool(v)
    return True


def format_float(f: float) -> str:
    """fmt's %v for float64 (strconv 'g' with the shortest digits; exponent form below 1e-4 or from 1e6 (on)."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    sign, digits, exponent = Decimal(repr(f)).as_tuple()
    ds = "".join(map(str, digits)).rstrip("0") or "0"
    dp = len(digits) + int(exponent)  # position of the decimal point in `ds`
    exp = dp - 1
    neg = "-" if sign else ""
    if exp < -4 or exp >= 6:
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mant}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if dp <= 0:
        return f"{neg}0.{'0' * -dp}{ds}"
    if dp >= len(ds):
        return neg + ds + "0" * (dp - len(ds))
    return f"{neg}{ds[:dp]}.{ds[dp:]}"


def fmt_value(v: Any, top: bool = True) -> str:
    """fmt's %v. `top`: an action printing nil writes `<no value>`; nil inside a value prints `<nil>`."""
    if v is None:
        return "<no value>" if top else "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_float(v)
    if isinstance(v, str):
        return v
    if isinstance(v, GoStruct):
        if v.text is not None:
            return v.text
        return "{" + " ".join(fmt_value(x, False) for x in v.fields.values()) + "}"
    if isinstance(v, list | tuple):
        return "[" + " ".join(fmt_value(x, False) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{fmt_value(v[k], False)}" for k in sorted(v, key=str)) + "]"
    return str(v)


def sprint(args: list[Any]) -> str:
    """fmt.Sprint: a space between operands when neither side is a string."""
    out: list[str] = []
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(fmt_value(a, False))
    return "".join(out)


def sprintf(fmt: str, args: list[Any]) -> str:
    """fmt.Sprintf for the verbs templates use: %v %s %d %q %f %t %x %%, with flags and width."""
    out: list[str] = []
    i = n = 0
    while i < len(fmt):
        c = fmt[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        j = i + 1
        while j < len(fmt) and fmt[j] in "+-# 0123456789.":
            j += 1
        if j >= len(fmt):
            out.append("%!(NOVERB)")
            break
        spec, verb = fmt[i + 1:j], fmt[j]
        i = j + 1
        if verb == "%":
            out.append("%")
            continue
        if n >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        a = args[n]
        n += 1
        out.append(_format_one(spec, verb, a))
    if n < len(args):
        out.append("%!(EXTRA " + ", ".join(f"{type_name(a)}={fmt_value(a, False)}" for a in args[n:]) + ")")
    return "".join(out)


def _format_one(spec: str, verb: str, a: Any) -> str:
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit()).lstrip("0")
    left = "-" in spec
    zero = spec.startswith("0") or spec.replace("-", "").startswith("0")
    prec = spec.split(".")[1] if "." in spec else None
    if verb in "vs":
        text = fmt_value(a, False) if not (isinstance(a, float) and prec) else f"{a:.{prec}f}"
    elif verb == "d" and isinstance(a, int) and not isinstance(a, bool):
        text = str(a)
    elif verb == "q" and isinstance(a, str):
        text = go_quote(a)
    elif verb in "feg" and isinstance(a, int | float) and not isinstance(a, bool):
        text = f"{float(a):.{prec or 6}{verb}}"
    elif verb == "t" and isinstance(a, bool):
        text = "true" if a else "false"
    elif verb in "xX" and isinstance(a, int | str):
        text = format(a, verb) if isinstance(a, int) else a.encode().hex()
        text = text.upper() if verb == "X" else text
    else:
        return f"%!{verb}({type_name(a)}={fmt_value(a, False)})"
    if width and len(text) < int(width):
        pad = int(width) - len(text)
        text = text + " " * pad if left else ("0" if zero and not left else " ") * pad + text
    return text


def go_json(v: Any) -> str:
    """encoding/json.Marshal: compact, HTML characters escaped (\\u003c...), integral floats without `.0`."""
    if isinstance(v, GoStruct):
        return go_json(v.json)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "null"  # Go returns an error here; the template's json func then prints ""
        a = abs(v)
        if a != 0 and (a < 1e-6 or a >= 1e21):
            return repr(v).replace("e-0", "e-")
        return format_float_f(v)
    if isinstance(v, str):
        return _json_string(v)
    if isinstance(v, list | tuple):
        return "[" + ",".join(go_json(x) for x in v) + "]"
    if isinstance(v, dict):
        # Go sorts map keys; struct-like JSON objects (from GoStruct.json) keep their field order
        keys = list(v) if getattr(v, "_ordered", False) else sorted(v, key=str)
        return "{" + ",".join(_json_string(str(k)) + ":" + go_json(v[k]) for k in keys) + "}"
    return _json_string(str(v))


class OrderedObject(dict):
    """A JSON object whose keys keep their order (a Go struct's fields or an ordered map), not Go's sorted map."""

    _ordered = True


def format_float_f(v: float) -> str:
    """strconv 'f' with the shortest digits (what encoding/json writes between 1e-6 and 1e21)."""
    if v == int(v):
        return str(int(v))
    return format(Decimal(repr(v)), "f")


def _json_string(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or ch in "<>&" or o in (0x2028, 0x2029):
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_quote(s: str) -> str:
    """strconv.Quote: Go escapes; printable Unicode is kept."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\a\b\f\n\r\t\v":
            out.append("\\" + "abfnrtv"["\a\b\f\n\r\t\v".index(ch)])
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif o < 0x10000:
            out.append(f"\\u{o:04x}" if o > 0xFF else f"\\x{o:02x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


class CompareError(Exception):
    pass


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if v is None:
        return "nil"
    return "other"


def go_eq(a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka == "nil" or kb == "nil":
        if ka == kb:
            return True
        raise CompareError("incompatible types for comparison")
    if ka != kb:
        raise CompareError("incompatible types for comparison")
    if ka == "other":
        if isinstance(a, list | tuple | dict) or isinstance(b, list | tuple | dict):
            raise CompareError("non-comparable type")
        return a == b
    return a == b


def go_lt(a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        raise CompareError("incompatible types for comparison")
    if ka not in ("int", "float", "string"):
        raise CompareError("invalid type for comparison")
    return a < b
