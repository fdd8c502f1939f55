"""``lowbit qat --method tsq``: the CLI takes TSQ from the QAT registry, options through --option."""
from __future__ import annotations

import lowbit
from lowbit.quant.layers import quant_layers
from lowbit.quant.sparse import SparseActQuantizer
from tests.test_cli import _top1, run_json, setup  # noqa: F401  (setup is a fixture)


def test_qat_tsq_from_the_cli(setup, capsys) -> None:  # noqa: F811
    tmp, common = setup
    out = tmp / "tsq.lowbit"
    args = ["qat", *common, "--method", "tsq", "--w-bits", "2", "--a-bits", "2", "--epochs", "1",
            "--batch-size", "16", "--calib-size", "32", "--option", "samples=128", "--option", "iters=1",
            "--option", "sparsity=0.4", "--out", str(out)]
    res = run_json(capsys, args)
    assert res["finished"] and res["method"] == "tsq" and out.exists()
    loaded = lowbit.load(out)
    assert any(isinstance(l.input_quant, SparseActQuantizer) for _, l in quant_layers(loaded))
    assert res["quant_top1"] == _top1(loaded, tmp / "fmnist")
    names = {(m["name"], m["kind"]) for m in run_json(capsys, ["methods"])["methods"]}
    assert ("tsq", "qat") in names
