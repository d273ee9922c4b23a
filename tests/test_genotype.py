"""Genotype model, zoo, DARTS-repr import and the `bats genotype` commands."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from helpers import cli, one_line_error
from pydantic import ValidationError

from bats_cli.core.darts_import import parse_darts_genotype
from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import Edge, Genotype, genotype_json_schema, load_genotype
from bats_cli.core.spaces import SPACES
from bats_cli.core.zoo import resolve_genotype, zoo_names

ROOT = Path(__file__).resolve().parents[1]
TOP_ZOO = ROOT / "genotypes"
ZOO = ("amoebanet_a", "bats_c10", "darts_v1", "darts_v2", "nasnet_a", "pdarts")

DARTS_V2_REPR = (
    "DARTS_V2 = Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
    "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=range(2, 6))"
)


def _base() -> dict:
    return json.loads((TOP_ZOO / "darts_v2.json").read_text())


# ---- the zoo ---------------------------------------------------------------------------------


def test_zoo_contents():
    assert tuple(zoo_names()) == ZOO
    assert sorted(p.stem for p in TOP_ZOO.glob("*.json")) == list(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_file_loads(name):
    g = load_genotype(TOP_ZOO / f"{name}.json")
    assert g.name == name
    assert g.source and g.notes
    assert resolve_genotype(name) == g
    assert resolve_genotype(str(TOP_ZOO / f"{name}.json")) == g
    # The files are written canonically, so a save reproduces them byte for byte.
    assert g.to_json() == (TOP_ZOO / f"{name}.json").read_text()


def test_one_copy_of_the_bundled_genotypes():
    # The package finds them through a link to the top-level folder, never through a second copy.
    pkg = ROOT / "bats_cli" / "genotypes"
    assert pkg.is_symlink() and pkg.resolve() == TOP_ZOO.resolve()


def test_zoo_node_counts_and_spaces():
    expect = {
        "bats_c10": ("bats", 4, 4),
        "darts_v1": ("darts", 4, 4),
        "darts_v2": ("darts", 4, 4),
        "pdarts": ("darts", 4, 4),
        "nasnet_a": ("darts", 5, 5),
        "amoebanet_a": ("darts", 5, 5),
    }
    for name, (space, n_normal, n_reduce) in expect.items():
        g = resolve_genotype(name)
        assert (g.space, g.steps("normal"), g.steps("reduce")) == (space, n_normal, n_reduce)
        assert g.nodes == n_normal
    assert resolve_genotype("amoebanet_a").reduce_concat == (3, 4, 6)
    assert resolve_genotype("nasnet_a").normal_concat == (2, 3, 4, 5, 6)
    assert "conv_7x1_1x7" in resolve_genotype("amoebanet_a").ops_used
    assert "sep_conv_7x7" in resolve_genotype("nasnet_a").ops_used


def test_bats_c10_is_flagged_as_unverified():
    g = resolve_genotype("bats_c10")
    assert "unverified" in (g.notes or "")
    assert set(g.ops_used) <= set(SPACES["bats"].ops)


def test_views():
    g = resolve_genotype("darts_v2")
    assert g.edges("normal")[7] == Edge(node=5, input=2, op="dil_conv_3x3")
    assert len(g.edges("reduce")) == 8
    assert g.ops_used == ("max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")
    assert g.concat("normal") == (2, 3, 4, 5)
    with pytest.raises(ValueError):
        g.steps("middle")  # type: ignore[arg-type]


def test_frozen_and_hashable():
    g = resolve_genotype("darts_v1")
    with pytest.raises(ValidationError):
        g.name = "x"  # type: ignore[misc]
    assert hash(g) == hash(resolve_genotype("darts_v1"))


def test_resolve_name_normalisation_and_errors(tmp_path, monkeypatch):
    assert resolve_genotype("DARTS-V2").name == "darts_v2"
    with pytest.raises(UserInputError, match="neither a genotype file nor a bundled genotype"):
        resolve_genotype("no_such_genotype")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match="available as `bats_c10`"):
        resolve_genotype("bats_c10.json")


# ---- validation rules ------------------------------------------------------------------------


def _err(data: dict) -> str:
    with pytest.raises(UserInputError) as info:
        Genotype.from_dict(data, origin="x.json")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("x.json: ")
    return msg


def test_rules():
    d = _base()
    assert "normal[5]: op 'sep_conv_9x9' is not in the 'darts' space; valid: none" in _err(
        {**d, "normal": d["normal"][:5] + [["sep_conv_9x9", 1]] + d["normal"][6:]}
    )
    assert "reduce[0]: op 'group_conv_3x3' is not in the 'darts' space" in _err(
        {**d, "reduce": [["group_conv_3x3", 0]] + d["reduce"][1:]}
    )
    assert "normal[1]: input 2 is an index from the future" in _err(
        {**d, "normal": [d["normal"][0], ["skip_connect", 2]] + d["normal"][2:]}
    )
    assert "normal[0]: input -1 is negative" in _err(
        {**d, "normal": [["skip_connect", -1]] + d["normal"][1:]}
    )
    assert "normal: 7 entries" in _err({**d, "normal": d["normal"][:7]})
    assert "reduce: empty" in _err({**d, "reduce": []})
    assert "normal_concat[1]: 6 is not a node" in _err({**d, "normal_concat": [2, 6]})
    assert "normal_concat[0]: 1 is not a node" in _err({**d, "normal_concat": [1]})
    assert "normal_concat[1]: node 2 is listed twice" in _err({**d, "normal_concat": [2, 2]})
    assert "reduce_concat: empty" in _err({**d, "reduce_concat": []})
    assert "color: unknown field" in _err({**d, "color": "red"})
    assert "reduce: required field is missing" in _err(
        {k: v for k, v in d.items() if k != "reduce"}
    )
    assert "space: Input should be 'bats' or 'darts'" in _err({**d, "space": "nas"})
    assert "normal[0][1]" in _err({**d, "normal": [["sep_conv_3x3", "0"]] + d["normal"][1:]})
    assert "normal[0][1]" in _err({**d, "normal": [["sep_conv_3x3", True]] + d["normal"][1:]})
    assert "normal[0]" in _err({**d, "normal": [["sep_conv_3x3"]] + d["normal"][1:]})
    assert "name" in _err({**d, "name": ""})
    # Several problems are all reported, on one line.
    both = _err({**d, "normal": d["normal"][:7], "reduce_concat": [9]})
    assert "normal: 7 entries" in both and "reduce_concat[0]: 9" in both and "; " in both


def test_five_node_cells_and_sparse_concat_allowed():
    d = _base()
    g = Genotype.model_validate(
        {
            **d,
            "normal": d["normal"] + [["skip_connect", 5], ["sep_conv_3x3", 0]],
            "normal_concat": [4, 6],
        }
    )
    assert g.steps("normal") == 5 and g.steps("reduce") == 4


def test_json_round_trip_and_atomic_save(tmp_path):
    g = resolve_genotype("amoebanet_a")
    assert Genotype.from_json(g.to_json()) == g
    out = g.save(tmp_path / "sub" / "a.json")
    assert out.read_text().endswith("}\n")
    assert load_genotype(out) == g
    assert [p.name for p in out.parent.iterdir()] == ["a.json"]  # no temp file left behind
    bare = Genotype.model_validate(
        {k: v for k, v in g.to_dict().items() if k not in ("source", "notes")}
    )
    assert "source" not in bare.to_json()


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"{not json", "not valid JSON (line 1"),
        (b"[1, 2]", "expected a JSON object"),
        (b"\xff\xfe\x00garbage", "not a UTF-8 text file"),
        (b'{"name": "a", "name": "b"}', "duplicate key 'name'"),
        (b"Genotype(normal=[('sep_conv_3x3', 1)])", "bats genotype import"),
    ],
)
def test_load_bad_files(tmp_path, content, needle):
    p = tmp_path / "g.json"
    p.write_bytes(content)
    with pytest.raises(UserInputError) as info:
        load_genotype(p)
    assert str(p) in str(info.value) and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_load_missing_and_directory(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        load_genotype(tmp_path / "nope.json")
    with pytest.raises(UserInputError, match="is a directory"):
        load_genotype(tmp_path)


def test_schema():
    schema = genotype_json_schema()
    assert set(schema["required"]) == {
        "name",
        "space",
        "normal",
        "normal_concat",
        "reduce",
        "reduce_concat",
    }
    assert schema["additionalProperties"] is False
    ops = schema["properties"]["normal"]["items"]["prefixItems"][0]["enum"]
    assert "group_conv_5x5" in ops and "sep_conv_3x3" in ops
    json.dumps(schema)


# ---- DARTS Python repr -----------------------------------------------------------------------


def test_parse_darts_matches_zoo():
    g = parse_darts_genotype(DARTS_V2_REPR)
    zoo = resolve_genotype("darts_v2")
    assert g.name == "darts_v2" and g.space == "darts"
    assert (g.normal, g.normal_concat, g.reduce, g.reduce_concat) == (
        zoo.normal,
        zoo.normal_concat,
        zoo.reduce,
        zoo.reduce_concat,
    )


@pytest.mark.parametrize("name", ZOO)
def test_darts_repr_round_trip(name):
    g = resolve_genotype(name)
    back = parse_darts_genotype(
        g.to_darts(), name=g.name, space=g.space, source=g.source, notes=g.notes
    )
    assert back == g


def test_parse_darts_variants():
    # Positional fields, tuple concat, per-node nesting (some DARTS derivatives print that).
    g = parse_darts_genotype(
        "Genotype([[('group_conv_3x3', 1), ('skip_connect', 0)]], (2,), "
        "[('max_pool_3x3', 0), ('max_pool_3x3', 1)], list(range(2, 3)))"
    )
    assert (
        g.space == "bats"
        and g.name == "imported"
        and g.normal == (("group_conv_3x3", 1), ("skip_connect", 0))
    )
    module = (
        "from collections import namedtuple\nGenotype = namedtuple('G', 'a b')\n"
        + DARTS_V2_REPR
        + "\nDARTS = DARTS_V2\n"
    )
    assert parse_darts_genotype(module, pick="DARTS").normal == resolve_genotype("darts_v2").normal
    with pytest.raises(UserInputError, match="several genotypes"):
        parse_darts_genotype(module + "\n" + DARTS_V2_REPR.replace("DARTS_V2", "OTHER"))
    with pytest.raises(UserInputError, match="no `NOPE = Genotype"):
        parse_darts_genotype(module, pick="NOPE")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("__import__('os').system('echo hi')", "is not Genotype("),
        (
            "Genotype(normal=__import__('os').system('echo hi'), normal_concat=[2], "
            "reduce=[], reduce_concat=[2])",
            "not a literal",
        ),
        (
            "Genotype(normal=[(open('/etc/passwd').read(), 0)], normal_concat=[2], "
            "reduce=[], reduce_concat=[2])",
            "not a literal",
        ),
        ("Genotype(normal=[('sep_conv_3x3', 1)]", "not valid Python syntax"),
        ("Genotype(normal=[('sep_conv_3x3', 1)])", "missing normal_concat"),
        (
            "Genotype(normal=[('x', 0), ('y', 1)], normal_concat=[2], "
            "reduce=[('x', 0), ('y', 1)], reduce_concat=[2])",
            "belong to no known space",
        ),
        (
            "Genotype(normal=[('sep_conv_3x3', 5), ('sep_conv_3x3', 1)], normal_concat=[2], "
            "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])",
            "index from the future",
        ),
        (
            "Genotype(normal=[1, 2], normal_concat=[2], reduce=[], reduce_concat=[2], extra=1)",
            "unknown argument 'extra'",
        ),
    ],
)
def test_parse_darts_rejects(text, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match=None) as info:
        parse_darts_genotype(text)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---- CLI -------------------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    d = _base()
    cases = {
        "unknown_op": (
            {**d, "normal": [["sep_conv_9x9", 0]] + d["normal"][1:]},
            "normal[0]: op 'sep_conv_9x9'",
        ),
        "future": (
            {**d, "reduce": d["reduce"][:7] + [["skip_connect", 6]]},
            "reduce[7]: input 6 is an index from the future",
        ),
        "odd": ({**d, "normal": d["normal"][:5]}, "normal: 5 entries"),
        "extra_key": ({**d, "colour": "red"}, "colour: unknown field"),
    }
    out = {}
    for name, (data, needle) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(data))
        out[name] = (p, needle)
    (tmp_path / "not_json.json").write_text("{'name': 'x'}")
    out["not_json"] = (tmp_path / "not_json.json", "not valid JSON")
    (tmp_path / "empty.json").write_text("")
    out["empty"] = (tmp_path / "empty.json", "empty")
    out["missing"] = (tmp_path / "missing.json", "no such file")
    return out


def test_cli_validate_bad_files(tmp_path, capsys):
    for name, (path, needle) in _bad_files(tmp_path).items():
        line = one_line_error(*cli(["genotype", "validate", str(path)], capsys)[::2], needle)
        assert str(path) in line, (name, line)


def test_cli_validate_ok_and_mixed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = cli(["genotype", "validate", *(f"genotypes/{n}.json" for n in ZOO)], capsys)
    assert code == 0, err
    assert out.count("ok ") == len(ZOO)
    bad = _bad_files(tmp_path)
    mixed = cli(["genotype", "validate", "genotypes/bats_c10.json", str(bad["odd"][0]), str(bad["empty"][0])],
                capsys)
    one_line_error(*mixed[::2], "2 of 3 genotypes are invalid")


def test_cli_show_list_schema(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = cli(["genotype", "show", "nasnet_a"], capsys)
    assert code == 0, err
    assert "sep_conv_7x7" in out and "reduce cell" in out
    code, out, err = cli(["genotype", "show", "genotypes/bats_c10.json", "--json"], capsys)
    assert out == (TOP_ZOO / "bats_c10.json").read_text(), err
    code, out, err = cli(["genotype", "list"], capsys)
    assert code == 0 and all(n in out for n in ZOO), err
    code, out, err = cli(["genotype", "schema"], capsys)
    assert code == 0 and json.loads(out)["title"] == "Genotype", err
    one_line_error(*cli(["genotype", "show", "nonexistent"], capsys)[::2], "neither a genotype file")


def test_cli_help_has_examples(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the example line unwrapped
    for cmd in ("show", "validate", "schema", "list", "import"):
        code, out, _ = cli(["genotype", cmd, "--help"], capsys)
        assert code == 0 and "Example: bats genotype" in out, cmd


def test_cli_import(tmp_path, capsys, monkeypatch):
    out = tmp_path / "v2.json"
    code, _, err = cli(["genotype", "import", DARTS_V2_REPR, "-o", str(out), "--space", "darts", "--name", "mine"],
                       capsys)
    assert code == 0, err
    g = load_genotype(out)
    assert g.name == "mine" and g.normal == resolve_genotype("darts_v2").normal
    one_line_error(*cli(["genotype", "import", DARTS_V2_REPR, "-o", str(out)], capsys)[::2], "already exists")
    code, _, err = cli(["genotype", "import", DARTS_V2_REPR, "-o", str(out), "--force", "--name", "again"], capsys)
    assert code == 0, err
    assert load_genotype(out).name == "again"
    monkeypatch.setattr("sys.stdin", io.StringIO(DARTS_V2_REPR))
    code, piped, err = cli(["genotype", "import", "-"], capsys)
    assert code == 0 and Genotype.from_json(piped).name == "darts_v2", err


def test_cli_import_never_executes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    one_line_error(*cli(["genotype", "import", payload], capsys)[::2], "is not Genotype(")
    wrapped = f"Genotype(normal={payload}, normal_concat=[2], reduce=[], reduce_concat=[2])"
    one_line_error(*cli(["genotype", "import", wrapped], capsys)[::2], "not a literal")
    assert not marker.exists()
