"""Exporters and size reports read quantized layers through ``quant.layer_specs`` only: no deploy module,
``summary.py`` or ``deploy/size.py`` imports a quantizer class or reads a quantizer's attributes.

Parsed from the source (ast), so an import inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

from torch import nn

import lowbit
import lowbit.deploy

DEPLOY = Path(lowbit.deploy.__file__).parent
SUMMARY = Path(lowbit.__file__).parent / "summary.py"
# modules that never need a quantizer object at all: every width and byte comes from the specs
SPEC_ONLY = (SUMMARY, DEPLOY / "size.py")
# quantizer implementations: what a spec describes, never what an exporter may look inside
FORBIDDEN_MODULES = {"lowbit.quant.quantizer", "lowbit.quant.sparse", "lowbit.quant.dmbq_quantizers",
                     "lowbit.quant.learnable", "lowbit.quant.dmbq", "lowbit.quant.bitplanes"}
# layer structure (kinds, names, channel counts) is not a quantizer internal
ALLOWED_FROM_LAYERS = {"LAYER_KINDS", "QUANT_LAYERS", "QuantLayer", "float_weight_layers", "layer_kind", "out_channels",
                       "quant_layers"}
FORBIDDEN_NAMES = {"WeightQuantizer", "ActQuantizer", "SparseActQuantizer", "DmbqWeight", "DmbqAct",
                   "LearnedStepWeight", "LearnedStepAct", "SoftRoundWeight", "SparseStepAct"}
QUANTIZERS = {"weight_quant", "input_quant"}  # the attributes that hold a layer's quantizers
MODULE_API = set(dir(nn.Module))  # hooks, state_dict, to(): what any module has, not a quantizer internal


def _package(path: Path) -> str:
    """The dotted package a module of lowbit lives in (what its relative imports start from);
    lowbit.deploy for a probe file outside the package."""
    root = Path(lowbit.__file__).parent.resolve().parent
    if not path.resolve().is_relative_to(root):
        return "lowbit.deploy"
    return ".".join(path.resolve().relative_to(root).parent.parts)


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """``(absolute module, imported name or None)`` for every import in a module."""
    package = _package(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative to the module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out += [(module, alias.name) for alias in node.names]
            out += [(f"{module}.{alias.name}", None) for alias in node.names]  # "from ..quant import sparse"
    return out


def _violations(path: Path) -> list[str]:
    bad = []
    for module, name in _imports(path):
        if module in FORBIDDEN_MODULES or name in FORBIDDEN_NAMES:
            bad.append(f"{module}{'.' + name if name else ''}")
        elif module == "lowbit.quant.layers" and name is not None and name not in ALLOWED_FROM_LAYERS:
            bad.append(f"{module}.{name}")
        elif module == "lowbit.quant" and name is not None and name not in {"spec", "layer_specs"}:
            bad.append(f"{module}.{name}")
    return bad


def _is_quantizer(node: ast.AST) -> bool:
    """``<anything>.weight_quant`` / ``.input_quant``, read (not assigned)."""
    return isinstance(node, ast.Attribute) and node.attr in QUANTIZERS and isinstance(node.ctx, ast.Load)


def _attribute_reads(path: Path, spec_only: bool) -> list[str]:
    """Quantizer attributes a module reads, as ``line: source``.

    Everywhere: ``x.weight_quant.bits`` or ``getattr(x.weight_quant, "bits")`` for anything but the
    ``nn.Module`` interface (an exporter may hook or replace a quantizer module, not read its
    fields). ``spec_only`` modules may not touch a quantizer at all: no ``x.weight_quant`` read and
    no ``"weight_quant"`` string given to getattr/hasattr. Going through a local alias
    (``wq = layer.weight_quant; wq.bits``) is what the strict form rules out; the general form
    cannot see it, so exporters that alias a quantizer are left to review.
    """
    source = path.read_text()
    bad = []
    for node in ast.walk(ast.parse(source, str(path))):
        hit = False
        if isinstance(node, ast.Attribute) and _is_quantizer(node.value) and node.attr not in MODULE_API:
            hit = True
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"getattr", "hasattr"}:
            args = node.args
            key = args[1].value if len(args) > 1 and isinstance(args[1], ast.Constant) else None
            if args and _is_quantizer(args[0]) and key not in MODULE_API:
                hit = True
            elif spec_only and key in QUANTIZERS:
                hit = True
        elif spec_only and _is_quantizer(node):
            hit = True
        if hit:
            bad.append(f"{node.lineno}: {ast.get_source_segment(source, node)}")
    return bad


def test_deploy_modules_do_not_import_quantizer_internals() -> None:
    modules = sorted(DEPLOY.glob("*.py")) + [SUMMARY]
    assert {p.name for p in modules} >= {"artifact.py", "onnx_qdq.py", "integer.py", "multibit.py", "size.py",
                                         "summary.py"}
    found = {p.name: _violations(p) for p in modules}
    assert not any(found.values()), found


def test_no_module_reads_quantizer_attributes() -> None:
    modules = sorted(DEPLOY.glob("*.py")) + [SUMMARY]
    found = {p.name: _attribute_reads(p, p in SPEC_ONLY) for p in modules}
    assert not any(found.values()), found


def test_the_check_sees_a_forbidden_import(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from ..quant.sparse import SparseActQuantizer\nfrom ..quant.layers import output_channel_scale\n"
                     "def f():\n    from lowbit.quant.quantizer import WeightQuantizer\n")
    assert _violations(probe) == ["lowbit.quant.sparse.SparseActQuantizer", "lowbit.quant.layers.output_channel_scale",
                                  "lowbit.quant.quantizer.WeightQuantizer"]


def test_summary_imports_resolve_from_its_own_package() -> None:
    # summary.py sits in lowbit, not lowbit.deploy: ".quant.quantizer" there is lowbit.quant.quantizer
    assert _package(SUMMARY) == "lowbit" and _package(DEPLOY / "size.py") == "lowbit.deploy"
    assert ("lowbit.quant.layer_specs", "layer_specs") in _imports(SUMMARY)


def test_the_check_sees_a_quantizer_attribute_read(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f(layer, specs):\n"
                     "    a = layer.weight_quant.bits\n"                   # 2: read anywhere
                     "    b = getattr(layer.input_quant, 'alpha', None)\n"  # 3: read anywhere
                     "    layer.input_quant.register_forward_hook(print)\n"  # module API: fine
                     "    layer.weight_quant = None\n"                     # replacing a quantizer: fine
                     "    wq = layer.weight_quant\n"                       # 6: spec-only modules only
                     "    c = hasattr(layer, 'input_quant')\n"             # 7: spec-only modules only
                     "    return f'{layer}.weight_quant.scale'\n")         # a state-dict key: fine
    assert [b.split(":")[0] for b in _attribute_reads(probe, spec_only=False)] == ["2", "3"]
    assert {int(b.split(":")[0]) for b in _attribute_reads(probe, spec_only=True)} == {2, 3, 4, 6, 7}


def test_no_deploy_module_imports_another_modules_private_names() -> None:
    """Shared helpers have public names (``legacy_multibit`` once read ``artifact._Reader``); torch's
    private exporter API is torch's business (``onnx_qdq``)."""
    modules = sorted(DEPLOY.glob("*.py")) + [SUMMARY]
    found = {p.name: [f"{m}.{n}" for m, n in _imports(p)
                      if m.startswith("lowbit") and n and n.startswith("_") and not n.startswith("__")]
             for p in modules}
    assert not any(found.values()), found
