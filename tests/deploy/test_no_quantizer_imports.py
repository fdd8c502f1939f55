"""The exporters read quantized layers through ``quant.layer_specs`` only: no deploy module imports a quantizer class.

Parsed from the source (ast), so an import inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import lowbit.deploy

DEPLOY = Path(lowbit.deploy.__file__).parent
# quantizer implementations: what a spec describes, never what an exporter may look inside
FORBIDDEN_MODULES = {"lowbit.quant.quantizer", "lowbit.quant.sparse", "lowbit.quant.dmbq_quantizers",
                     "lowbit.quant.learnable", "lowbit.quant.dmbq", "lowbit.quant.bitplanes"}
# layer structure (kinds, names, channel counts) is not a quantizer internal
ALLOWED_FROM_LAYERS = {"LAYER_KINDS", "QUANT_LAYERS", "QuantLayer", "float_weight_layers", "layer_kind", "out_channels",
                       "quant_layers"}
FORBIDDEN_NAMES = {"WeightQuantizer", "ActQuantizer", "SparseActQuantizer", "DmbqWeight", "DmbqAct",
                   "LearnedStepWeight", "LearnedStepAct", "SoftRoundWeight", "SparseStepAct"}


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """``(absolute module, imported name or None)`` for every import in a deploy module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative to lowbit.deploy
                base = "lowbit.deploy".rsplit(".", node.level - 1)[0] if node.level > 1 else "lowbit.deploy"
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


def test_deploy_modules_do_not_import_quantizer_internals() -> None:
    modules = sorted(DEPLOY.glob("*.py"))
    assert {p.name for p in modules} >= {"artifact.py", "onnx_qdq.py", "integer.py", "multibit.py"}
    found = {p.name: _violations(p) for p in modules}
    assert not any(found.values()), found


def test_the_check_sees_a_forbidden_import(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from ..quant.sparse import SparseActQuantizer\nfrom ..quant.layers import output_channel_scale\n"
                     "def f():\n    from lowbit.quant.quantizer import WeightQuantizer\n")
    assert _violations(probe) == ["lowbit.quant.sparse.SparseActQuantizer", "lowbit.quant.layers.output_channel_scale",
                                  "lowbit.quant.quantizer.WeightQuantizer"]
