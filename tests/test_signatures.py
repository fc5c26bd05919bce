"""Every public function of scvae.tl and scvae.pl follows scanpy's conventions.

The data object comes first (``adata``; for tl functions that need one, the ``model`` second;
``pl`` functions take the one object they draw), everything else is keyword-only, nothing is
hidden in ``*args``/``**kwargs``, every parameter and the return value are annotated (and the
annotations resolve), and the numpydoc docstring documents every parameter, the return value
and has an example.
"""

from __future__ import annotations

import inspect
import re
import typing
from types import FunctionType, ModuleType

import anndata as ad
import pandas as pd
import pytest
from matplotlib.axes import Axes

import scvae
from scvae import pl, tl
from scvae.model import SCVAE

# tl: adata first, then the model where one is needed; pl: the one object it draws.
TL_POSITIONAL = ("adata", "model")
PL_FIRST = {"model", "de", "adata"}


def public_functions(module: ModuleType) -> list[FunctionType]:
    return [
        obj
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and inspect.isfunction(obj)
        and obj.__module__ == module.__name__
    ]


FUNCTIONS = [f for m in (tl, pl) for f in public_functions(m)]


def test_the_namespaces_hold_what_users_expect():
    names = {f"{f.__module__}.{f.__name__}" for f in FUNCTIONS}
    assert {
        "scvae.tl.fit",
        "scvae.tl.normalized_expression",
        "scvae.tl.differential_expression",
        "scvae.pl.history",
        "scvae.pl.volcano",
    } <= names


def documented_parameters(doc: str) -> list[str]:
    """Names in the numpydoc ``Parameters`` section (``a, b`` lines list several)."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(
            i
            for i, ln in enumerate(lines[:-1])
            if ln == "Parameters" and set(lines[i + 1]) == {"-"}
        )
    except StopIteration:
        return []
    names: list[str] = []
    for i in range(start + 2, len(lines)):
        line = lines[i]
        if i + 1 < len(lines) and line and set(lines[i + 1]) == {"-"}:
            break  # the next section
        if line and not line[0].isspace():
            head = line.split(" : ")[0]
            names += [n.strip() for n in head.split(",") if n.strip()]
    return names


def sections(doc: str) -> set[str]:
    lines = inspect.cleandoc(doc).splitlines()
    return {
        lines[i]
        for i in range(len(lines) - 1)
        if lines[i] and re.fullmatch(r"-{3,}", lines[i + 1]) and len(lines[i + 1]) >= 3
    }


@pytest.mark.parametrize("func", FUNCTIONS, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_signature_follows_scanpy(func):
    name = f"{func.__module__}.{func.__name__}"
    params = list(inspect.signature(func).parameters.values())
    kinds = inspect.Parameter
    assert not [p.name for p in params if p.kind in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)], (
        f"{name} hides options in *args/**kwargs"
    )
    positional = [p.name for p in params if p.kind != kinds.KEYWORD_ONLY]
    if func.__module__ == "scvae.pl":
        assert len(positional) == 1 and positional[0] in PL_FIRST, (name, positional)
    else:
        assert positional and positional[0] == "adata", f"{name}: adata must come first"
        assert tuple(positional) == TL_POSITIONAL[: len(positional)], (
            f"{name}: only {TL_POSITIONAL} may be positional, got {positional}"
        )
    for p in params:
        if p.kind != kinds.KEYWORD_ONLY:
            assert p.default is inspect.Parameter.empty, f"{name}: {p.name} is positional"
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without a type annotation: {missing}"
    assert inspect.signature(func).return_annotation is not inspect.Signature.empty, name
    # the (string) annotations resolve to real types
    namespace = {"ad": ad, "SCVAE": SCVAE, "Axes": Axes, "pd": pd}
    hints = typing.get_type_hints(func, localns=namespace)
    assert set(hints) == {p.name for p in params} | {"return"}


@pytest.mark.parametrize("func", FUNCTIONS, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_docstring_documents_every_parameter(func):
    name = f"{func.__module__}.{func.__name__}"
    doc = func.__doc__ or ""
    assert doc.strip(), f"{name} has no docstring"
    documented = documented_parameters(doc)
    params = list(inspect.signature(func).parameters)
    assert sorted(documented) == sorted(params), (
        f"{name}: undocumented {sorted(set(params) - set(documented))}, "
        f"documented but absent {sorted(set(documented) - set(params))}"
    )
    assert len(documented) == len(set(documented)), f"{name} documents a parameter twice"
    assert {"Parameters", "Returns", "Examples"} <= sections(doc), (name, sections(doc))


def test_the_checks_can_fail():
    def bad(adata, layer=None, **kwargs):
        """Nothing.

        Parameters
        ----------
        adata
            Cells.
        """

    params = inspect.signature(bad).parameters
    assert params["layer"].kind != inspect.Parameter.KEYWORD_ONLY
    assert documented_parameters(bad.__doc__) == ["adata"]
    assert "Examples" not in sections(bad.__doc__)
    assert documented_parameters(scvae.tl.differential_expression.__doc__)[:3] == [
        "adata",
        "model",
        "groupby",
    ]
