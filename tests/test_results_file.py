"""benchmarks/RESULTS.md matches the shipped checkpoints, and reproduce.py files sections by seed table."""
from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest

from lowbit.models.zoo import pretrained_path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
HASH = re.compile(r"([A-Za-z0-9_]+) `([0-9a-f]{12})`")


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", BENCH / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


reproduce = load_reproduce()


def stated_checkpoints(section: str) -> dict[str, str]:
    """``{model: hash}`` from a section's ``checkpoints: name `hash`, ...`` stamp."""
    match = re.search(r"checkpoints: ([^;]*);", section)
    return dict(HASH.findall(match[1])) if match else {}


def shipped_hash(name: str) -> str:
    return hashlib.sha256(pretrained_path(name).read_bytes()).hexdigest()[:12]


def test_every_stated_checkpoint_hash_is_the_shipped_checkpoint():
    text = (BENCH / "RESULTS.md").read_text()
    checked = 0
    for name, section in reproduce.sections(text).items():
        for model, digest in stated_checkpoints(section).items():
            assert digest == shipped_hash(model), (
                f"RESULTS.md section {name} measured {model} `{digest}`, but the package ships "
                f"`{shipped_hash(model)}`: rerun its table with benchmarks/reproduce.py")
            checked += 1
    assert checked > 0, "no section of RESULTS.md states a checkpoint hash"


def test_table_blocks_are_registered_and_every_section_in_them_names_its_checkpoints():
    text = (BENCH / "RESULTS.md").read_text()
    tables = reproduce.table_by_key()
    for key, block in reproduce.table_blocks(text).items():
        assert key in tables, f"RESULTS.md has a block for unregistered table {key}"
        for name, section in reproduce.sections(block).items():
            assert name.startswith(tables[key].owns), f"section {name} does not belong to table {key}"
            if tables[key].models:
                assert stated_checkpoints(section), f"section {name} of table {key} states no checkpoint hash"


def test_registry_names_existing_scripts_and_unique_keys_and_owners():
    keys = [t.key for t in reproduce.TABLES]
    assert len(keys) == len(set(keys))
    owners = [p for t in reproduce.TABLES for p in t.owns]
    for i, p in enumerate(owners):
        for q in owners[i + 1:]:
            assert not p.startswith(q) and not q.startswith(p), f"tables share the section prefix {p} / {q}"
    for table in reproduce.TABLES:
        assert table.seed in reproduce.SEEDS
        for run in table.runs:
            assert (BENCH / run.script).is_file(), run.script


def fake_script(tmp_path: Path, name: str, section: str, value: str) -> str:
    """A benchmark script that writes one section through benchmarks/common.py, as the real ones do."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(f"""
        import argparse, sys
        sys.path.insert(0, {str(BENCH)!r})
        from common import parse_args, write_section
        ap = argparse.ArgumentParser()
        ap.add_argument("--bits", type=int, default=4)
        args = parse_args(ap)
        write_section({section!r}, "## {value} at W" + str(args.bits) + "\\n\\nbody", ["resnet20"])
    """))
    return str(path)


def test_only_replaces_its_table_block_and_retires_legacy_sections_it_owns(tmp_path, monkeypatch):
    tables = (
        reproduce.Table("t-a", "004", "A", (reproduce.Run(fake_script(tmp_path, "a", "alpha-x", "first"),
                                                          ("--bits", "3"), ("--bits", "2")),), ("alpha-",)),
        reproduce.Table("t-b", "000", "B", (reproduce.Run(fake_script(tmp_path, "b", "beta-x", "second")),),
                        ("beta-",)),
    )
    monkeypatch.setattr(reproduce, "TABLES", tables)
    results = tmp_path / "RESULTS.md"
    legacy = ("# old\n\n<!-- section:alpha-old -->\nstale alpha\n<!-- /section:alpha-old -->\n\n"
              "<!-- section:gamma -->\nunowned\n<!-- /section:gamma -->\n")
    results.write_text(legacy)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--only", "t-a", "--results", str(results)])
    reproduce.main()
    text = results.read_text()
    assert "stale alpha" not in text, "the table's rerun must retire its legacy sections"
    assert "unowned" in text and reproduce.LEGACY_HEADING in text
    block = reproduce.table_blocks(text)["t-a"]
    assert "### first at W3" in block, "section headings move below the table heading"
    assert "settings: bits=3" in block and "checkpoints: resnet20 `" in block
    assert "load average" in block

    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--only", "t-b", "--results", str(results)])
    reproduce.main()
    text = results.read_text()
    assert set(reproduce.table_blocks(text)) == {"t-a", "t-b"}
    assert text.index("Seed 004") < text.index("Seed 000"), "seeds appear in registry order"
    assert "### first at W3" in text, "--only t-b keeps t-a's block"

    # A full run replaces the file wholesale: legacy sections and stale blocks are gone.
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--quick", "--results", str(results)])
    reproduce.main()
    text = results.read_text()
    assert "unowned" not in text and reproduce.LEGACY_HEADING not in text
    assert "### first at W2" in text and "### first at W3" not in text
    assert "--quick" in text.splitlines()[0]


def test_a_table_that_writes_nothing_is_an_error(tmp_path, monkeypatch):
    silent = tmp_path / "silent.py"
    silent.write_text("print('no section')\n")
    monkeypatch.setattr(reproduce, "TABLES", (reproduce.Table("t", "004", "T", (reproduce.Run(str(silent)),),
                                                              ("t-",)),))
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--results", str(tmp_path / "R.md")])
    with pytest.raises(SystemExit, match="wrote no section"):
        reproduce.main()


def test_reassemble_orders_blocks_by_seed_and_puts_loose_sections_last(tmp_path, monkeypatch):
    text = ("# x\n\n<!-- section:loose -->\nloose one\n<!-- /section:loose -->\n\n"
            "<!-- table:outside-zoo -->\nzoo block\n<!-- /table:outside-zoo -->\n\n"
            "<!-- table:004-table4 -->\ntable four\n<!-- /table:004-table4 -->\n")
    path = tmp_path / "R.md"
    path.write_text(text)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--reassemble", "--results", str(path)])
    reproduce.main()
    out = path.read_text()
    assert out.index("table four") < out.index("zoo block") < out.index(reproduce.LEGACY_HEADING) < out.index("loose one")
    assert reproduce.table_blocks(out) == reproduce.table_blocks(text), "blocks are moved, never changed"
