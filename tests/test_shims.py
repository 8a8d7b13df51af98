"""The stand-ins vals get for host machinery (sandbox/shims.py): `str.format` and `format_map`
that read fields through the policy's guarded getattr, and the `io` facade's StringIO.

In-process, as tests/test_policy.py: each case compiles a small val with `load_val` and calls
its export.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from sandbox.policy import LogBuffer, load_val


def call(source: str, *args: object) -> Any:
    val = load_val(textwrap.dedent(source), "f", {}, LogBuffer(65536))
    assert callable(val.export)
    return val.export(*args)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('"{} and {}".format(1, "two")', "1 and two"),
        ('"{0}{1}{0}".format("a", "b")', "aba"),
        ('"{name}!".format(name="x")', "x!"),
        ('"{0[1]}".format([5, 6])', "6"),
        ('"{0[k]}".format({"k": "v"})', "v"),
        ('"{p.x}".format(p=P())', "3"),
        ('"{0.x:>4}|".format(P())', "   3|"),
        ('"{0!r}".format("s")', "'s'"),
        ('"{0:.2f}".format(3.14159)', "3.14"),
        ('"{0:{1}}".format(7, "03")', "007"),
        ('"{a[0]}-{b}".format_map({"a": [1], "b": 2})', "1-2"),
        ('str.format("{}+{}", 1, 2)', "1+2"),
        ('str.format_map("{x}", {"x": 9})', "9"),
        ('"{{literal}}".format()', "{literal}"),
    ],
)
def test_format_works_as_python_s_for_what_vals_write(expression: str, expected: str) -> None:
    source = f"""
    class P:
        x = 3

    def f():
        return {expression}
    """
    assert call(source) == expected


@pytest.mark.parametrize(
    "expression",
    [
        '"{0.__class__}".format(1)',
        '"{0.__class__.__base__}".format("s")',
        '"{x._private}".format(x=P())',
        '"{0[0].__globals__}".format([f])',
        '"{0.__init__.__globals__}".format(P())',
        '"{a.__dict__}".format_map({"a": P()})',
        'str.format("{0.__class__}", 1)',
    ],
)
def test_format_fields_cannot_walk_to_underscore_names(expression: str) -> None:
    source = f"""
    class P:
        x = 3

    def f():
        return {expression}
    """
    # The guard's own refusal, not some other failure that would hide a walk that worked.
    with pytest.raises(AttributeError, match="is an invalid attribute name because it starts"):
        call(source)


def test_format_of_a_missing_field_is_the_vals_error() -> None:
    with pytest.raises(IndexError):
        call('def f():\n    return "{0}{1}".format("only one")')
    with pytest.raises(KeyError):
        call('def f():\n    return "{missing}".format_map({})')


def test_stringio_reads_and_writes_like_io_stringio() -> None:
    source = """
    from io import StringIO

    def f():
        buffer = StringIO("first\\n")
        buffer.seek(6)
        buffer.write("second\\nthird")
        buffer.writelines(["\\n", "fourth"])
        buffer.seek(0)
        lines = [buffer.readline(), buffer.read(3)]
        rest = buffer.readlines()
        buffer.seek(0)
        every = [line for line in buffer]
        return lines, rest, every, buffer.getvalue(), buffer.tell()
    """
    lines, rest, every, value, position = call(source)
    assert lines == ["first\n", "sec"]
    assert rest == ["ond\n", "third\n", "fourth"]
    assert every == ["first\n", "second\n", "third\n", "fourth"]
    assert value == "first\nsecond\nthird\nfourth"
    assert position == len(value)


def test_stringio_overwrites_after_a_seek_and_refuses_relative_seeks() -> None:
    source = """
    from io import StringIO

    def f(whence):
        buffer = StringIO("abcdef")
        buffer.seek(2)
        buffer.write("XY")
        if whence:
            buffer.seek(0, whence)
        return buffer.getvalue(), buffer.tell(), repr(buffer)
    """
    assert call(source, 0) == ("abXYef", 4, "<StringIO at 4>")
    with pytest.raises(ValueError, match="absolute position"):
        call(source, 2)
