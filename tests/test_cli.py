"""``prune-env``: the search job end to end, resume, Ctrl-C, reloading, export, listing and clear errors.

Runs are tiny (random search, 2-4 evaluations, 96 validation samples, at most one fine-tune epoch) and the
base model comes from the session's shared cache (the ``digits_base`` fixture trains it once).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_output import one_error_line
from torch import nn

import prune_env
from prune_env.app import cli, runfiles
from prune_env.checkpoint import read_spec
from prune_env.data import Splits
from prune_env.train import evaluate

TINY = ["--agent", "random", "--eval-samples", "96", "--no-progress"]


def _search(out: Path, *extra: str) -> int:
    return cli.main(["search", *TINY, "--out", str(out), *extra])


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "evaluations.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def finished_run(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path, digits_base: tuple[nn.Module, dict]
) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNE_ENV_CACHE", str(shared_cache))
        assert _search(out, "--evals", "4", "--finetune-epochs", "1", "--target-macs", "0.5") == 0
    return out


def test_search_writes_consistent_results(finished_run: Path, digits_base: tuple[nn.Module, dict]) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    assert results["status"] == "finished"
    assert results["agent"] == "random"
    assert results["evals_done"] == results["budget_evals"] == 4
    assert len(_rows(finished_run)) == 4
    assert results["macs_ratio"] <= 0.5 + 1e-9
    assert results["macs"] <= 0.5 * results["base_macs"]
    assert results["macs_ratio"] == pytest.approx(results["macs"] / results["base_macs"])
    assert set(results["ratios"]) == set(results["keep"]) == set(results["channels"])
    for name, k in results["keep"].items():
        assert 1 <= k <= results["channels"][name]
    best = max(_rows(finished_run), key=lambda r: float(r["reward"]))
    assert results["proxy_accuracy"] == pytest.approx(float(best["accuracy"]))
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert results["base_test_accuracy"] == pytest.approx(digits_base[1]["test_accuracy"])
    assert results["finetune_epochs"] == 1
    assert set(results["timings"]) >= {"base_seconds", "search_seconds", "finetune_seconds", "total_seconds"}
    assert {"python", "torch", "torchvision", "gymnasium"} <= set(results["versions"])
    assert results["hardware"]["cpu_count"] >= 1 and results["hardware"]["torch_threads"] >= 1
    revision = results["git_revision"]  # this checkout's commit (None only for an installed package)
    assert revision is None or len(revision.removesuffix("+dirty")) == 40
    assert "--evals 4" in results["command"]
    for name in (
        "search.png",
        "allocation.png",
        "log.txt",
        "state.json",
        "model/model.json",
        "model/model.pt",
    ):
        assert (finished_run / name).is_file(), name
    # Uniform pruning to the same target, the reference the allocation plot shows the best policy against.
    assert set(results["uniform_keep"]) == set(results["keep"])
    assert (
        len(set(np.round([k / results["channels"][n] for n, k in results["uniform_keep"].items()], 1))) <= 2
    )
    assert "search done" in (finished_run / "log.txt").read_text()
    # The default agent (evolution) logs every evaluation to TensorBoard too.
    assert list((finished_run / "tensorboard").glob("events.out.tfevents.*"))


def test_saved_model_is_the_finetuned_one(finished_run: Path, digits: Splits) -> None:
    """load_pruned gives the model whose test accuracy results.json reports, at the reported cost."""
    results = json.loads((finished_run / "results.json").read_text())
    model = prune_env.load_pruned(finished_run / "model")
    assert evaluate(model, digits.test)["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-12)
    x = digits.test.tensors[0][:1]
    assert prune_env.count_macs(model, x) == results["macs"]
    assert prune_env.count_params(model) == results["params"]
    # Reloading twice gives identical outputs (no randomness in rebuilding).
    again = prune_env.load_pruned(finished_run / "model")
    batch = digits.test.tensors[0][:32]
    with torch.no_grad():
        assert torch.equal(model(batch), again(batch))
    assert read_spec(finished_run / "model")["meta"]["finetuned"] is True


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_eval_and_export(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], digits: Splits
) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    assert cli.main(["eval", str(finished_run / "model")]) == 0
    out = capsys.readouterr().out
    assert f"accuracy: {results['test_accuracy']:.4f}" in out
    assert f"{results['macs']:,}" in out

    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    target, script = tmp_path / "pruned.onnx", tmp_path / "pruned.pt"
    saved = str(finished_run / "model")
    assert cli.main(["export", saved, "--onnx", str(target), "--torchscript", str(script)]) == 0
    assert "max |difference| from PyTorch" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(target)))
    # Both run on the embedded data as PyTorch does, at any batch size.
    model = prune_env.load_pruned(finished_run / "model").eval()
    x = digits.test.tensors[0][:5]
    with torch.no_grad():
        expected = model(x).numpy()
        scripted = torch.jit.load(str(script))(x).numpy()
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(scripted - expected).max() <= 1e-5
    assert np.abs(exported - expected).max() <= 1e-5
    assert cli.main(["export", saved]) == 2
    assert "--onnx FILE, --torchscript FILE" in capsys.readouterr().err


def test_an_export_that_disagrees_with_pytorch_is_not_written(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prune_env.app import model_commands

    target = tmp_path / "pruned.pt"
    monkeypatch.setattr(model_commands, "EXPORT_TOLERANCE", -1.0)  # no export can pass
    assert cli.main(["export", str(finished_run / "model"), "--torchscript", str(target)]) == 2
    assert "differs from PyTorch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_run_needs_resume(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _search(finished_run, "--evals", "4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"prune-env: error: {finished_run} already holds a run (state.json, ")
    assert err[0].endswith("add --resume to continue it or choose another --out")


def test_resume_continues_where_it_stopped(
    cached: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _search(out, "--evals", "2", "--finetune-epochs", "0") == 0
    first = _rows(out)
    assert len(first) == 2
    assert _search(out, "--evals", "4", "--finetune-epochs", "0", "--resume") == 0
    rows = _rows(out)
    assert len(rows) == 4
    assert rows[:2] == first  # replayed, not re-run or rewritten
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]
    assert rows[2]["keep"] != rows[0]["keep"]  # the resumed agent goes on, it does not repeat itself
    results = json.loads((out / "results.json").read_text())
    assert results["evals_done"] == 4
    assert results["best_reward"] == pytest.approx(max(float(r["reward"]) for r in rows))
    assert "resumed: 2 evaluations replayed" in capsys.readouterr().err

    # A resume must not silently change what is being searched.
    assert _search(out, "--evals", "6", "--resume", "--target-macs", "0.3") == 2
    assert "cannot resume" in capsys.readouterr().err
    assert _search(out, "--evals", "6", "--resume", "--no-fill-budget") == 2
    assert "fill_budget=True (now False)" in capsys.readouterr().err


def test_ctrl_c_saves_partial_results_and_resume_finishes(
    cached: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    original = runfiles.RunLog.__call__

    def interrupt_after_two(self: runfiles.RunLog, entry: object) -> None:
        original(self, entry)
        if self.state["evals_done"] == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during the search

    monkeypatch.setattr(runfiles.RunLog, "__call__", interrupt_after_two)
    assert _search(out, "--evals", "4", "--finetune-epochs", "0") == 130
    err = capsys.readouterr().err
    assert "--resume" in err
    assert "Traceback" not in err
    partial = json.loads((out / "results.json").read_text())
    assert partial["status"] == "interrupted"
    assert partial["evals_done"] == 2
    assert partial["test_accuracy"] is None
    assert len(_rows(out)) == 2
    assert (out / "search.png").is_file() and (out / "allocation.png").is_file()
    assert read_spec(out / "model")["meta"]["finetuned"] is False  # the best policy so far, not fine-tuned

    monkeypatch.setattr(runfiles.RunLog, "__call__", original)
    assert _search(out, "--evals", "4", "--finetune-epochs", "0", "--resume") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished"
    assert results["evals_done"] == 4
    assert len(_rows(out)) == 4


def test_resume_drops_a_truncated_last_row_and_keeps_the_file_aside(cached: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _search(out, "--evals", "2", "--finetune-epochs", "0") == 0
    with (out / "evaluations.csv").open("a") as fh:
        fh.write("2,0.5,0.5")  # what a hard kill mid-write leaves behind
    before = (out / "evaluations.csv").read_bytes()
    assert _search(out, "--evals", "3", "--finetune-epochs", "0", "--resume") == 0
    assert [int(r["index"]) for r in _rows(out)] == [0, 1, 2]
    (aside,) = out.glob("evaluations.csv.*.orig")
    assert aside.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet21"], "unknown model 'resnet21'"),
        (["--agent", "nope"], "unknown agent 'nope'"),
        (["--dataset", "mnist3"], "unknown dataset 'mnist3'"),
        (["--target-macs", "0.001"], "is impossible"),
        (["--target-params", "1.5"], "in (0, 1]"),
        (["--evals", "0"], "--evals must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_fail_in_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["search", *args, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err)
    assert not (tmp_path / "run").exists()  # checked before anything is written or trained


def test_bad_paths_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert cli.main(["search", "--resume", "--agent", "random", "--out", str(tmp_path / "none")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "no saved pruned model" in lines[0]
    assert "nothing to resume" in lines[1]


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "prune_env", "search", "--model", "nope", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("prune-env: error: unknown model 'nope'; known models:")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_list_names_everything_the_registries_hold(capsys: pytest.CaptureFixture[str]) -> None:
    from agents.registry import available
    from prune_env.app.job import default_agent
    from prune_env.data import DATASET_NAMES
    from prune_env.models import available_models
    from prune_env.rewards import PRESETS

    assert cli.main(["list"]) == 0
    lines = {
        line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
    }
    # The names list is kept without importing the registries: it must name exactly what they hold.
    assert lines["models"] == ", ".join(available_models()) + ", tv:NAME (any torchvision classifier)"
    assert lines["datasets"] == ", ".join(DATASET_NAMES)
    default = default_agent()
    assert lines["agents"] == ", ".join(a + (" (default)" if a == default else "") for a in available())
    assert lines["rewards"] == ", ".join(PRESETS)


def test_the_agent_catalog_names_the_module_that_registers_each_agent() -> None:
    from agents.registry import discover
    from prune_env.app.agent_catalog import AGENT_MODULES

    registered = discover()
    assert set(AGENT_MODULES) == set(registered)
    for name, spec in registered.items():
        assert spec.run.__module__ == AGENT_MODULES[name], name


def test_list_imports_neither_torch_nor_an_agent() -> None:
    code = (
        "import sys; from prune_env.app import cli; cli.main(['list']); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('agents', 'stable_baselines3'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_search_from_given_weights_trains_nothing(
    digits_base: tuple[torch.nn.Module, dict[str, float]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """--weights PATH: the base model is the given trained one (no training, nothing cached), reported with
    its own test accuracy; a file that does not fit the model or is not a state_dict is refused in one line."""
    from prune_env import train

    weights = tmp_path / "resnet20.pt"
    torch.save(digits_base[0].state_dict(), weights)
    monkeypatch.setenv("PRUNE_ENV_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(train, "_fit", lambda *a, **k: pytest.fail("--weights must not train"))
    out = tmp_path / "run"
    assert _search(out, "--weights", str(weights), "--evals", "2", "--finetune-epochs", "0") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["base_test_accuracy"] == pytest.approx(digits_base[1]["test_accuracy"])
    assert results["settings"]["weights"] == str(weights)
    assert not (tmp_path / "empty-cache").exists()
    capsys.readouterr()

    wrong = tmp_path / "vgg.pt"
    torch.save(prune_env.models.get_model("tiny", 10, 1).state_dict(), wrong)
    (tmp_path / "text.pt").write_text("not weights")
    for path, message in ((wrong, "does not fit"), (tmp_path / "text.pt", "not a loadable state_dict"),
                          (tmp_path / "none.pt", "no such file")):  # fmt: skip
        assert _search(tmp_path / "other", "--weights", str(path), "--evals", "2") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_budget_range_search_saves_a_policy_that_apply_uses(
    cached: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--budget-range: one PPO search over targets 0.3-0.7 saves its policy with the run and makes the run's
    model for --target-macs; `prune-env apply` prunes for other targets in the range, spending no
    evaluation, and refuses targets outside it and runs without a policy."""
    out = tmp_path / "run"
    args = ("--agent", "ppo", "--budget-range", "0.3", "0.7", "--evals", "4", "--finetune-epochs", "0")
    assert cli.main(["search", "--eval-samples", "96", "--no-progress", "--out", str(out), *args]) == 0
    assert (out / "policy" / "policy.pt").is_file() and (out / "policy" / "policy.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["policy_applied"] is True and results["proxy_accuracy"] is None
    assert results["macs_ratio"] <= 0.5 + 1e-9 and results["settings"]["budget_range"] == [0.3, 0.7]
    rows = _rows(out)
    capsys.readouterr()

    for target in (0.35, 0.65):
        assert cli.main(["apply", str(out), "--target", str(target), "--no-progress"]) == 0
        assert "no evaluation spent" in capsys.readouterr().out
        saved = out / "applied" / f"macs-{target:g}"
        model = prune_env.load_pruned(saved)
        x = torch.zeros(1, 1, 8, 8)
        assert prune_env.count_macs(model, x) <= target * results["base_macs"]
    assert _rows(out) == rows  # the log is untouched: apply evaluates nothing

    assert cli.main(["apply", str(out), "--target", "0.9"]) == 2
    assert "outside the range the policy was searched for" in capsys.readouterr().err
    assert cli.main(["apply", str(out), "--target", "0.35", "--no-progress"]) == 2  # already there
    assert "exists" in capsys.readouterr().err
    other = tmp_path / "plain"
    assert _search(other, "--evals", "2", "--finetune-epochs", "0") == 0
    capsys.readouterr()
    assert cli.main(["apply", str(other), "--target", "0.4"]) == 2
    assert "holds no policy" in capsys.readouterr().err
    assert cli.main(["apply", str(tmp_path / "nowhere"), "--target", "0.4"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    # An agent of one target (the default) carries its best allocation over the range.
    assert (
        _search(tmp_path / "r", "--budget-range", "0.3", "0.7", "--evals", "2", "--finetune-epochs", "0") == 0
    )
    assert json.loads((tmp_path / "r" / "policy" / "policy.json").read_text())["kind"] == "allocation"
    assert cli.main(["apply", str(tmp_path / "r"), "--target", "0.35", "--no-progress"]) == 0
    capsys.readouterr()
    # Targets outside the range and resuming are refused before any work.
    assert _search(tmp_path / "y", "--agent", "ppo", "--budget-range", "0.1", "0.3") == 2
    assert "outside --budget-range" in capsys.readouterr().err
