"""Names in docstrings and docs resolve: a rename cannot leave a stale ``:class:`` role or doc reference.

Docstrings: every Sphinx role (``:mod:``, ``:class:``, ``:func:``, ``:meth:``, ``:attr:``, ``:data:``,
``:exc:``, ``:obj:``) in the library, the trainer, the scripts and ``app.py`` names something that exists,
resolved the way Sphinx would: a leading dot is relative to the module's package (Python's relative-import
rule), a bare name is looked up in the module, its enclosing class and its package, and a dotted name is
imported. Docs (README.md, docs/*.md): every repository path in backticks exists, every
``mugstan_chat.x.y`` / ``mugstan_train.x.y`` name resolves, every ``Class.member`` whose class is one of ours
names a member that class has, and every ``module.function(`` call of one of our modules names a function
that module has.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mugstan_chat", "mugstan_train")
ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|exc|obj):`~?([^`<>]+?)(?:\(\))?`")
MISSING = object()


def python_files():
    """(path, dotted module name or None for scripts and app.py) for every Python file whose docs we own."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] in ("__init__", "__main__"):  # a __main__ runs its command when imported: read as its package
                parts.pop()
            yield path, ".".join(parts)
    for path in sorted((ROOT / "scripts").glob("*.py")):
        yield path, None
    yield ROOT / "app.py", None


def docstrings(path: Path):
    """(docstring, enclosing class name or None) for the module, each class and each function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node, cls):
        text = ast.get_docstring(node, clean=False) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if text:
            yield text, cls
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from walk(child, child.name if cls is None else f"{cls}.{child.name}")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, cls)

    yield from walk(tree, None)


def lookup(dotted: str):
    """The object a dotted name names (longest importable module prefix, then attributes), or MISSING."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = member(obj, name)
            if obj is MISSING:
                return MISSING
        return obj
    return MISSING


def member(obj, name: str):
    """``getattr``, plus the members a class declares without a class attribute (fields, ``self.x = ...``)."""
    if hasattr(obj, name):
        return getattr(obj, name)
    if inspect.isclass(obj):
        if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
            return name
        for klass in obj.__mro__:
            if name in getattr(klass, "__annotations__", {}):
                return name
            try:
                source = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            if re.search(rf"\bself\.{re.escape(name)}\s*[:=]", source):
                return name
    return MISSING


def file_names(path: Path) -> dict:
    """A script's (or app.py's) top-level names: name -> the dotted name it imports, or its AST node."""
    names = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.partition(".")[0]] = alias.name if alias.asname else alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names[target.id] = node
    return names


def class_has(node: ast.ClassDef, name: str) -> bool:
    """A member defined in a class's body (method, class attribute, field) or assigned as ``self.name``."""
    return any(getattr(child, "name", None) == name or (isinstance(child, ast.AnnAssign)
               and getattr(child.target, "id", None) == name) for child in node.body) or any(
        isinstance(n, ast.Attribute) and n.attr == name and isinstance(n.value, ast.Name) and n.value.id == "self"
        for n in ast.walk(node))


def resolves_in_file(target: str, path: Path) -> bool:
    """A role in a script or app.py: its own top-level names, the modules it imports, its sibling scripts."""
    if lookup(target) is not MISSING:
        return True
    first, _, rest = target.partition(".")
    names = file_names(path)
    found = names.get(first)
    if isinstance(found, str):
        return lookup(f"{found}.{rest}" if rest else found) is not MISSING
    if found is not None:
        return not rest or (isinstance(found, ast.ClassDef) and class_has(found, rest.partition(".")[0]))
    for sibling in (path.parent / f"{first}.py", ROOT / f"{first}.py"):  # a sibling script, or app.py
        if sibling.exists():
            return not rest or resolves_in_file(rest, sibling)
    return False


def candidates(target: str, module: str, cls: str | None):
    """The full names a role's target may mean, in the order Sphinx tries them."""
    is_package = (ROOT / Path(*module.split(".")) / "__init__.py").exists()
    package = module if is_package else module.rpartition(".")[0]
    if target.startswith("."):
        rest = target.lstrip(".")
        dots = len(target) - len(rest)
        base = package.split(".")
        base = base[: len(base) - (dots - 1)] if dots > 1 else base
        yield ".".join(base + [rest])
        if cls:
            yield f"{module}.{cls}.{rest}"
        yield f"{module}.{rest}"
        return
    yield target
    if cls:
        yield f"{module}.{cls}.{target}"
    yield f"{module}.{target}"
    yield f"{package}.{target}"


def resolves(target: str, module: str | None, cls: str | None, path: Path | None = None) -> bool:
    if module is None:
        return resolves_in_file(target, path)
    return any(lookup(name) is not MISSING for name in candidates(target, module, cls))


def test_every_docstring_role_resolves():
    stale = []
    checked = 0
    for path, module in python_files():
        for text, cls in docstrings(path):
            for target in ROLE.findall(text):
                checked += 1
                if not resolves(target.strip(), module, cls, path):
                    stale.append(f"{path.relative_to(ROOT)}: {target}")
    assert checked > 100, f"only {checked} roles found: the pattern no longer matches the docstrings"
    assert not stale, "docstring roles naming nothing:\n" + "\n".join(stale)


def doc_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def our_classes():
    """Class name -> class, for every public class our packages define (a name defined twice is ambiguous)."""
    found, ambiguous = {}, set()
    for path, module in python_files():
        if module is None:
            continue
        mod = importlib.import_module(module)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and obj.__module__ == module and not name.startswith("_"):
                if name in found and found[name] is not obj:
                    ambiguous.add(name)
                found[name] = obj
    return {name: obj for name, obj in found.items() if name not in ambiguous}


def our_modules():
    """Module basename -> dotted name, for the basenames that are unique across our packages."""
    names = {}
    for path, module in python_files():
        if module is not None:
            names.setdefault(module.rpartition(".")[2], []).append(module)
    return {base: dotted[0] for base, dotted in names.items() if len(dotted) == 1}


CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^(?:mugstan_chat|mugstan_train|training|scripts|tests|docs|examples)/[\w./-]*$")
DOTTED = re.compile(r"\b((?:mugstan_chat|mugstan_train)(?:\.\w+)+)")
CLASS_MEMBER = re.compile(r"\b([A-Z]\w*)\.(\w+)")
MODULE_CALL = re.compile(r"(?<![\w.])([a-z_]\w*)\.(\w+)\(")


def doc_problems(text: str, classes: dict, modules: dict):
    for span in CODE.findall(text):
        span = span.strip()
        if PATH.match(span):
            if not (ROOT / span).exists():
                yield f"path {span}"
            continue
        if re.search(r"\.(py|json|jsonl|csv|txt|mp4|md|sh|tar|safetensors|pth)\b", span) and "(" not in span:
            continue  # a file name, not a Python name
        for dotted in DOTTED.findall(span):
            if lookup(dotted) is MISSING:
                yield f"name {dotted}"
        for cls, name in CLASS_MEMBER.findall(span):
            if cls in classes and member(classes[cls], name) is MISSING:
                yield f"member {cls}.{name}"
        for mod, name in MODULE_CALL.findall(span):
            if mod in modules and lookup(f"{modules[mod]}.{name}") is MISSING:
                yield f"call {mod}.{name}("


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_every_doc_reference_resolves(path):
    problems = sorted(set(doc_problems(path.read_text(encoding="utf-8"), our_classes(), our_modules())))
    assert not problems, f"{path.relative_to(ROOT)} names what does not exist:\n" + "\n".join(problems)


def test_the_checks_catch_stale_names():
    """The resolver is not vacuous: made-up names in each form are reported, real ones are not."""
    classes, modules = our_classes(), our_modules()
    stale = ("`mugstan_chat/nowhere.py` `mugstan_chat.engine.feature_cache.NoSuchCache` `FeatureCache.no_such_method` "
             "`prefix_cache.no_such_function(model)`")
    assert len(list(doc_problems(stale, classes, modules))) == 4
    real = "`mugstan_chat/engine/conversation.py` `mugstan_chat.engine.feature_cache.FeatureCache` `FeatureCache.get_or_encode`"
    assert list(doc_problems(real, classes, modules)) == []
    assert not resolves(".service.ChatService", "mugstan_chat.entrypoints.openai.app", None)
    assert resolves(".worker", "mugstan_chat.entrypoints.openai.app", None)
    assert resolves(".readers.Question", "mugstan_chat.evaluation", None)
