"""What crosses an actor boundary is data, never code; user code comes only from the configured path.

Contract: no module of `async_pmd/`, `services/` or `job/` imports a pickle-like codec or calls `eval`,
`exec`, `torch.load` or an unsafe YAML loader (batches travel as `async_pmd.wire` bytes, checked
by the tests of tests/services/test_buffer_wire.py and test_faults.py); a reward spec is resolved
by import of exactly the module or file it names, and a spec that is code is refused unrun.
(The listening sockets of the embedded default are listed in tests/services/test_faults.py.)
"""

import ast
from pathlib import Path

import pytest

from async_pmd.rewards import load_reward_fn

REPO = Path(__file__).resolve().parents[2]
CODECS = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle", "joblib"}
CALLS = {"eval", "exec", "compile", "__import__"}
ATTRIBUTE_CALLS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                   ("pickle", "loads"), ("np", "load")}


def sources():
    for package in ("async_pmd", "services", "job"):
        yield from sorted((REPO / package).rglob("*.py"))


def offences(path: Path, root: Path = REPO) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in CODECS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in CODECS:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in CALLS:
                found.append(f"{f.id}(...)")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                    and (f.value.id, f.attr) in ATTRIBUTE_CALLS:
                found.append(f"{f.value.id}.{f.attr}(...)")
    return [f"{path.relative_to(root)}: {o}" for o in found]


def test_no_pickle_or_eval_in_the_code_that_moves_data():
    assert [o for path in sources() for o in offences(path)] == []


def test_the_scan_would_see_an_offence(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nfrom cloudpickle import loads\nx = eval('1')\nimport torch\ntorch.load('w')\n")
    assert len(offences(bad, root=tmp_path)) == 4


def test_reward_file_is_loaded_from_exactly_the_configured_path(tmp_path, monkeypatch):
    """Two files named reward.py, one also importable from sys.path and the working directory:
    a file spec loads the one it names, and only that one."""
    for name, value in (("named", 1.0), ("decoy", -1.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "reward.py").write_text(f"def fn(prompt, response, truth, extra):\n    return {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "decoy"))
    monkeypatch.chdir(tmp_path / "decoy")
    fn = load_reward_fn(f"{tmp_path / 'named' / 'reward.py'}:fn")
    assert fn("p", "r", "t", {}) == 1.0
    assert Path(fn.__code__.co_filename) == tmp_path / "named" / "reward.py"
    with pytest.raises(FileNotFoundError):  # a missing file never falls back to a module of that name
        load_reward_fn(f"{tmp_path / 'missing' / 'reward.py'}:fn")


@pytest.mark.parametrize("spec, error", [
    ("__import__('os').system('touch /tmp/pwned')", ValueError),
    ("lambda p, r, t, e: 1.0", ValueError),
    ("builtins:eval", TypeError),
    ("builtins:exec", TypeError),
    ("os:system", TypeError),
    ("tests/data/faulty_reward.py:reward; import os", ValueError),
])
def test_a_reward_spec_that_is_code_is_refused_unrun(spec, error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error):
        load_reward_fn(spec)
    assert not (tmp_path / "pwned").exists() and not Path("/tmp/pwned").exists()
