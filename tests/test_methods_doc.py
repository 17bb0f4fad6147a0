"""docs/methods.md's "Method options reference" table against the method registry.

Every registered method (``engines.base.available()``) has rows; every option its
function takes as keyword (what ``engines.base.check_options`` accepts) and every
option its validator (``MethodInfo.check``) declares has a row; every documented
option is accepted; every documented default is the function's default and passes the
validator; every row says what the option means and when to change it. A new method or
option, a renamed one, or a changed default fails here until the table says so.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import engines.base as methods

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
HEADING = "## Method options reference"
COLUMNS = ["method", "option", "default", "meaning", "when to change it"]


def _cells(line: str):
    """The cells of one table row (``\\|`` inside a cell is a literal bar)."""
    body = line.strip()
    assert body.startswith("|") and body.endswith("|"), line
    parts, cur, i = [], "", 1
    while i < len(body) - 1:
        if body[i] == "\\" and body[i + 1] == "|":
            cur += "|"
            i += 2
            continue
        if body[i] == "|":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += body[i]
        i += 1
    parts.append(cur.strip())
    return parts


def _names(cell: str):
    """``"`a`, `b`"`` → ``["a", "b"]``."""
    names = [c.strip() for c in cell.split(",")]
    assert all(n.startswith("`") and n.endswith("`") for n in names), cell
    return [n.strip("`") for n in names]


def table(text: str):
    """``{(method, option): (default cell, meaning, when)}`` of the section's table; a row
    with an empty method cell continues the previous method."""
    assert text.count(HEADING + "\n") == 1, f"docs/methods.md has no single {HEADING!r} section"
    section = text.split(HEADING + "\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert [c.lower() for c in _cells(lines[0])] == COLUMNS, lines[0]
    assert set(_cells(lines[1])) <= {"---", ":---", "---:", ":---:"}, lines[1]
    rows, current = {}, None
    for ln in lines[2:]:
        cells = _cells(ln)
        assert len(cells) == len(COLUMNS), f"a row with {len(cells)} cells: {ln}"
        method, option, default, meaning, when = cells
        if method:
            current = _names(method)
        assert current, f"a continuation row before any method: {ln}"
        (opt,) = _names(option)
        for m in current:
            assert (m, opt) not in rows, f"{m}.{opt} documented twice"
            rows[(m, opt)] = (default, meaning, when)
    return rows


def accepted(name: str):
    """The options ``check_options(name, ...)`` accepts: the function's keyword-only parameters."""
    params = inspect.signature(methods.get(name)).parameters
    return {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.fixture(scope="module")
def rows():
    return table(DOC.read_text(encoding="utf-8"))


def test_every_method_and_option_is_documented(rows):
    registered = methods.available()
    assert set(registered) >= {"unrolled", "neumann", "cg", "finite_difference", "darts", "sama"}
    documented_methods = {m for m, _ in rows}
    assert documented_methods == set(registered), (
        f"methods registered but not documented: {sorted(set(registered) - documented_methods)}; "
        f"documented but not registered: {sorted(documented_methods - set(registered))}")
    for name in registered:
        takes = accepted(name)
        assert takes, f"{name} takes no options?"
        documented = {o for m, o in rows if m == name}
        assert documented == set(takes), (
            f"{name}: options accepted but not documented: {sorted(set(takes) - documented)}; "
            f"documented but not accepted: {sorted(documented - set(takes))}")
        check = methods.info(name).check
        if check is not None:            # the validator declares the same options
            assert set(inspect.signature(check).parameters) == set(takes), name


def test_documented_options_are_accepted_and_the_others_refused(rows):
    for (name, option), _ in rows.items():
        methods.check_options(name, {})                       # (no option: every default)
        with pytest.raises(TypeError, match="has no option"):
            methods.check_options(name, {option + "_not_an_option": 1})


def test_documented_defaults_are_the_functions_defaults(rows):
    for (name, option), (default, _, _) in rows.items():
        assert default.startswith("`") and default.endswith("`"), f"{name}.{option}: default {default!r}"
        value = ast.literal_eval(default.strip("`"))
        real = accepted(name)[option]
        assert type(value) is type(real) and value == real, \
            f"{name}.{option}: documented default {value!r}, the function's is {real!r}"
        methods.check_options(name, {option: value})          # the validator takes it


def test_every_row_says_what_and_when(rows):
    for (name, option), (_, meaning, when) in rows.items():
        assert len(meaning) > 20, f"{name}.{option}: no meaning"
        assert len(when) > 10, f"{name}.{option}: no 'when to change it'"


def test_scale_by_lr_is_explained(rows):
    for name in ("finite_difference", "darts"):
        _, meaning, when = rows[(name, "scale_by_lr")]
        for part in ("H⁻¹ ≈ I", "H⁻¹ ≈ η·I", "one-step unrolled", "per parameter group",
                     "mlo_mae.md#hypergradient-weighting"):
            assert part in meaning, f"{part!r} not in scale_by_lr's meaning"


def test_parser_catches_a_missing_option_and_a_wrong_default():
    """The checks above can fail: a table without ``cg.damping`` and with another
    ``neumann.iterations`` default is caught."""
    text = DOC.read_text(encoding="utf-8")
    good = table(text)
    lines = [ln for ln in text.splitlines(keepends=True)
             if not (ln.startswith("| |") and "`damping`" in ln)]
    broken = "".join(lines).replace("| `neumann` | `iterations` | `10` |", "| `neumann` | `iterations` | `20` |")
    bad = table(broken)
    assert ("cg", "damping") in good and ("cg", "damping") not in bad
    assert ast.literal_eval(bad[("neumann", "iterations")][0].strip("`")) != accepted("neumann")["iterations"]
