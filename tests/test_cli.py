"""The ``channelcut`` command line, driven in a subprocess (plus a few in-process
checks of its helpers). Models are built by the factories below
(``test_cli:build_tiny``), so most runs take seconds.

Exit codes: 0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch
from torch import nn

import channelcut
from channelcut import cli

HERE = Path(__file__).resolve().parent


# -- model factories the CLI imports as test_cli:NAME ---------------------------
class Tiny(nn.Module):
    def __init__(self, width: int = 16, classes: int = 5, barrier: bool = False) -> None:
        super().__init__()
        self.barrier = barrier
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.a = nn.Conv2d(width, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn(self.stem(x)))
        if self.barrier:
            s = torch.kthvalue(s, 2, dim=1, keepdim=True).values * s  # no rule: a barrier
        y = torch.relu(self.a(s)) + self.b(s)
        return self.fc(y.mean((2, 3)))


def build_tiny(width: int = 16, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return Tiny(width, classes)


def build_barrier() -> nn.Module:
    torch.manual_seed(0)
    return Tiny(barrier=True)


# -- running the CLI ------------------------------------------------------------
def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run(
        [sys.executable, "-m", "channelcut", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(HERE)
    )


SHAPE = ["--input-shape", "2,3,8,8"]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    r = run_cli("prune", "test_cli:build_tiny", *SHAPE, "--amount", "0.25", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["params"]["after"] < report["params"]["before"]
    (out / "stdout.json").write_text(r.stdout)
    return out


def test_prune_writes_a_loadable_model(pruned_dir):
    report = json.loads((pruned_dir / "stdout.json").read_text())
    assert json.loads((pruned_dir / "report.json").read_text())["params"] == report["params"]
    plan = json.loads((pruned_dir / "plan.json").read_text())
    assert plan["metadata"]["model"] == "test_cli:build_tiny" and plan["metadata"]["amount"] == 0.25
    model = channelcut.load(pruned_dir, build_tiny)
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]
    assert report["verified"] and report["mode"] == "unconstrained"
    # the same command in-process gives the same model, bit for bit
    again = pruned_dir.parent / "again"
    assert cli.main(["prune", "test_cli:build_tiny", *SHAPE, "--amount", "0.25", "--out", str(again), "-q", "--json"]) == 0
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(channelcut.load(again, build_tiny)(x), model(x))


def test_prune_table_constrained_with_kwargs(tmp_path):
    r = run_cli(
        "prune", "test_cli:build_tiny", "--model-kwargs", '{"width": 12, "classes": 3}', *SHAPE,
        "--constrained", "--heuristic", "l2", "--out", str(tmp_path / "c"),
    )
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "MACs" in r.stdout and "constrained" in r.stdout
    assert "0 copies" in r.stdout
    assert "[1/6]" in r.stderr  # progress on stderr, not in the table
    model = channelcut.load(tmp_path / "c", lambda: build_tiny(12, 3))
    assert model.fc.out_features == 3


def test_inspect_json(tmp_path):
    r = run_cli("inspect", "test_cli:build_barrier", *SHAPE, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["producers"] == 4 and rep["consumers"] == 4
    assert [b["op"] for b in rep["barriers"]] == ["kthvalue"]
    assert 0 < rep["prunable_fraction"] < 1
    layers = {row["name"]: row for row in rep["layers"]}
    assert layers["stem.weight"]["prunable_out"] == 0  # feeds the barrier
    assert layers["stem.weight"]["prunable_in"] == 0  # reads the image
    assert layers["fc.weight"]["prunable_in"] == 16


def test_inspect_table_torchvision():
    r = run_cli("inspect", "resnet18", "--input-shape", "1,3,32,32", "--max-rows", "3", "-q")
    assert r.returncode == 0, r.stderr
    assert "21 producers, 21 consumers" in r.stdout
    assert "layer1.0.conv1.weight" in r.stdout and "more layers" in r.stdout
    assert "barrier ops: none" in r.stdout


def test_bench_saved_model(pruned_dir):
    r = run_cli("bench", str(pruned_dir), "--repeats", "3", "--warmup", "1", "--json", "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["params"]["pruned"] < rep["params"]["dense"]
    assert rep["macs"]["pruned"] < rep["macs"]["dense"]
    assert rep["latency_ms"]["dense"]["repeats"] == 3 and rep["latency_ms"]["pruned"]["median_ms"] > 0
    assert rep["input_shape"] == [[2, 3, 8, 8]]  # taken from the plan
    assert rep["copied_channels_per_inference"] >= 0


def test_export_saved_model_to_onnx(pruned_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "tiny.onnx"
    r = run_cli("export", str(pruned_dir), "--format", "onnx", "--out", str(out), "--json", "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)  # stdout holds only the JSON: exporter chatter goes to stderr
    assert rep["written"] == {"format": "onnx", "path": str(out), "verified": True}
    assert out.is_file() and out.stat().st_size > 0


def test_export_needs_something_to_do(pruned_dir, capsys):
    assert cli.main(["export", str(pruned_dir)]) == 2
    assert "--format" in capsys.readouterr().err
    assert cli.main(["export", str(pruned_dir), "--format", "pt2"]) == 2


def test_bench_model_name_table():
    r = run_cli("bench", "test_cli:build_tiny", *SHAPE, "--repeats", "2", "--warmup", "0")
    assert r.returncode == 0, r.stderr
    assert "latency median (ms)" in r.stdout and "speed-up" in r.stdout


# -- exit codes and messages ---------------------------------------------------------
def test_usage_errors_exit_2_in_a_subprocess():
    r = run_cli("prune", "resnet5O", "--out", "x")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "unknown model 'resnet5O'; did you mean resnet50" in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "test_cli:build_tiny", "--input-shape", "1,three", "--out", "x"], "bad input shape"),
        (["prune", "test_cli:build_tiny", "--input-shape", "1,4,8,8", "--out", "x"], "check --input-shape"),
        (["prune", "test_cli:build_tiny", "--amount", "1.5", "--out", "x", *SHAPE], "--amount"),
        (["prune", "test_cli:build_tiny"], "--out"),
        (["prune", "test_cli:no_such_factory", "--out", "x"], "no attribute"),
        (["prune", "no_such_module_xyz:f", "--out", "x"], "cannot import"),
        (["prune", "test_cli:build_tiny", "--model-kwargs", "{oops", "--out", "x"], "not valid JSON"),
        (["prune", "test_cli:build_tiny", "--model-kwargs", '{"depth": 3}', "--out", "x"], "check --model-kwargs"),
        (["inspect", "test_cli:build_tiny", "--heuristic", "l1"], "unrecognized arguments"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2(args: List[str], message: str, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err


def test_failures_exit_1_with_a_hint(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "plan.json").write_text("{}")
    r = run_cli("bench", str(tmp_path / "bad"))
    assert r.returncode == 1 and "not a channelcut plan" in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "bad" / "plan.json").write_text('{"format": "channelcut-pruned-model", "format_version": 7}')
    assert cli.main(["bench", str(tmp_path / "bad"), "-q"]) == 1
    assert "upgrade channelcut" in capsys.readouterr().err


def test_help_lists_every_command_and_demo_is_registered():
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("prune", "inspect", "bench", "export", "demo"):
        assert command in r.stdout
    assert run_cli("demo", "--help").returncode == 0


def test_console_script():
    script = Path(sys.executable).with_name("channelcut")
    if not script.exists():
        pytest.skip("the channelcut console script is not installed (pip install -e .)")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and channelcut.__version__ in r.stdout


# -- in-process helpers ------------------------------------------------------------
def test_l1_choice_is_channelcut_importance():
    from channelcut.importance import L1

    model = build_tiny()
    x = [torch.rand(2, 3, 8, 8)]
    pairs, how = cli.choose_channels(model, x, 0.25, "l1", constrained=False)
    assert how == "L1 via channelcut.importance"
    assert pairs == channelcut.MaskingManager(model, x).importance(L1()).select(0.25)
    by_layer = {}
    for name, c in pairs:
        by_layer.setdefault(name, []).append(c)
    assert len(by_layer["a.weight"]) == 4  # 25% of 16
    w = model.a.weight.detach().abs().sum((0, 2, 3))
    assert sorted(by_layer["a.weight"]) == sorted(torch.argsort(w)[:4].tolist())
    with pytest.raises(cli.CLIError) as err:
        cli.choose_channels(model, x, 0.25, "nope", constrained=False)
    assert err.value.code == 2


def test_parse_shape_and_tables():
    assert cli.parse_shape("1x3x8x8") == (1, 3, 8, 8)
    for bad in ("", "1,0,3", "a,b"):
        with pytest.raises(cli.CLIError):
            cli.parse_shape(bad)
    table = cli.format_table(["a", "b"], [["x", 1], ["long", 22]])
    assert table.splitlines()[2] == "x      1"


def test_timm_names():
    pytest.importorskip("timm")
    model, info = cli.build_model("timm:resnet10t", {"num_classes": 4})
    assert info["source"] == "timm" and info["input_shape"][:2] == [1, 3]
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)
