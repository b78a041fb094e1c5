"""lab/cli.py: bad input gives one clear line, a non-zero exit and no run left RUNNING; `--help`, README's
parameter table and MLproject's entry points tell the same story."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST_ARGS, ROOT, runs_by_status, subprocess_env, write_safetensors

from lab.cli import main


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("ablab: error:")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--a", "resnet5O"], "unknown model 'resnet5O'"),
        (["--data", "cifar11"], "unknown dataset 'cifar11'; did you mean cifar10"),
        (["--a", "/no/such/best.ckpt"], "checkpoint not found: '/no/such/best.ckpt'"),
        (["--data", "imagefolder:/no/such/dir"], "imagefolder: no such directory"),
        (["--epochs", "-2"], "epochs: -2 is out of range"),
        (["--placement", "diagonal"], "placement: 'diagonal' is not allowed"),
        (["--config", "configs/nope.yaml"], "config: no such file 'configs/nope.yaml'"),
        (["--allow_random_head", "false"], "would score randomly initialised weights"),
    ],
)
def test_bad_input_before_any_run(tracking: str, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    code = main(["run", *FAST_ARGS, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(_error_lines(err)) == 1 and message in _error_lines(err)[0], err
    assert runs_by_status(tracking).get("RUNNING", 0) == 0


@pytest.mark.slow  # two jobs in subprocesses (imports torch, timm, MLflow)
def test_bad_checkpoints_are_refused_before_any_run_exists(tracking: str, tmp_path: Path) -> None:
    """A checkpoint with the wrong class count, and a corrupt one: preflight refuses each with one line naming the
    file and the fix, exit 2, before the good arm trains and before any run exists in the store."""
    import timm
    from mlflow import MlflowClient

    five = write_safetensors(timm.create_model("resnet10t", num_classes=5), "resnet10t", tmp_path / "five.safetensors")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    cases = ((str(five), "has 5 output classes but the dataset has 10"), (f"resnet10t:{corrupt}", "could not be read"))
    for bad, says in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "lab", "run", *FAST_ARGS, "--arms", f"resnet10t,{bad}", "--placement", "lockstep"],
            env=subprocess_env(tracking),
            capture_output=True,
            text=True,
            timeout=400,
            cwd=ROOT,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = _error_lines(proc.stderr)
        assert len(lines) == 1 and says in lines[0]
    client = MlflowClient(tracking)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def _help(command: str, capsys: pytest.CaptureFixture) -> str:
    """`python -m lab <command> --help`, in process."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"--(\w+)", help_text)) - {"help"}


def _readme_parameters() -> list[str]:
    """First column of README's parameter table: `a`, `b` -> ["a", "b"]."""
    section = (ROOT / "README.md").read_text().split("\n## Parameters", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [name.strip().strip("`") for row in rows for name in row.split("|")[1].split(",")]


def test_help_and_readme_table_list_every_parameter(capsys: pytest.CaptureFixture) -> None:
    """Every parameter of README's table is a `run` option, and every config key is in the table."""
    from lab.config import FIELDS

    documented = _readme_parameters()
    assert len(documented) == len(set(documented)), documented
    options = _options(_help("run", capsys))
    assert set(documented) - options == set(), "in README's table but not in `python -m lab run --help`"
    assert {f.name for f in FIELDS} - set(documented) == set(), "config keys missing from README's table"
    assert options - set(documented) == set(), "`run` options missing from README's table"


def _cli_only(entry: str) -> set[str]:
    """Options an entry point leaves out on purpose: its `# cli-only: a, b, ...` comment (continued on `#   `)."""
    block = re.search(rf"^  {entry}:\n(.*?)(?=^  \w+:|\Z)", (ROOT / "MLproject").read_text(), re.M | re.S)
    assert block, entry
    names, listing = [], False
    for line in block.group(1).splitlines():
        text = line.strip()
        listing = text.startswith("# cli-only:") or (listing and text.startswith("#   "))
        if listing:
            names += re.findall(r"\w+", text.removeprefix("# cli-only:").removeprefix("#"))
    return set(names)


@pytest.mark.parametrize(
    ("entry", "command"), [("main", "run"), ("compare", "compare"), ("leaderboard", "leaderboard")]
)
def test_mlproject_entry_points_match_the_cli_one_to_one(
    entry: str, command: str, capsys: pytest.CaptureFixture
) -> None:
    """Each parameter is passed to the option of the same name, and each option is a parameter unless the entry
    point's `cli-only` comment says why not; the all-"" defaults mean "as in the YAML"."""
    from lab.cli import build_parser
    from lab.config import FIELD_BY_NAME, load_config

    project = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]
    params = project["parameters"]
    assert all({"type", "default"} <= set(spec) for spec in params.values())
    assert project["command"] == " ".join([f"python -m lab {command}", *[f"--{p} {{{p}}}" for p in params]])
    options, cli_only = _options(_help(command, capsys)), _cli_only(entry)
    assert set(params) - options == set(), f"{entry}: parameters the CLI does not accept"
    assert options - set(params) == cli_only, f"{entry}: CLI options neither parameters nor listed as cli-only"
    assert not cli_only & set(params)

    # A distinct value per parameter lands in the option of the same name: nothing is passed to the wrong one.
    values = {p: f"value-of-{p}" for p in params}
    args = build_parser().parse_args([command, *[x for p, v in values.items() for x in (f"--{p}", v)]])
    assert {p: getattr(args, p) for p in params} == values
    # The defaults ("" = not given) give the config of the default YAML.
    args = build_parser().parse_args([command, *[x for p, s in params.items() for x in (f"--{p}", str(s["default"]))]])
    given = {p: getattr(args, p) for p in params if p in FIELD_BY_NAME}
    assert load_config(ROOT / args.config, given) == load_config(ROOT / "configs/default.yaml")


def test_mlproject_plan_entry_point_matches_the_cli(capsys: pytest.CaptureFixture) -> None:
    project = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["plan"]
    params = project["parameters"]
    assert project["command"] == " ".join(["python -m lab plan", *[f"--{p} {{{p}}}" for p in params]])
    assert set(params) == _options(_help("plan", capsys)) and all(s["default"] == "" for s in params.values())
    # MLproject's "" defaults mean "not given", as on the command line.
    assert main(["plan", "--acc", "0.95", "--disagreement", "0.04", "--mde", "0.01", "--alpha", "",
                 "--fingerprint", ""]) == 0  # fmt: skip
    assert "80% power: 3,290 test images" in capsys.readouterr().out


def test_plan_prints_sizes_that_simulation_confirms(capsys: pytest.CaptureFixture) -> None:
    import numpy as np
    from scipy import stats as sps

    assert main(["plan", "--acc", "0.9", "--disagreement", "0.1", "--mde", "0.03"]) == 0
    out = capsys.readouterr().out
    sizes = [int(n.replace(",", "")) for n in re.findall(r"power: ([\d,]+) test images", out)]
    assert out.startswith("Paired exact McNemar test, two-sided alpha = 0.05: baseline accuracy 90.00%, A and B "
                          "differ on 10.00% of test images; to detect a gain of 3 points:") and len(sizes) == 2
    rng = np.random.default_rng(0)
    for n, target in zip(sizes, (0.8, 0.9), strict=True):  # 4,000 simulated experiments at each printed size
        counts = rng.multinomial(n, [0.035, 0.065, 0.9], size=4000)
        b, c = counts[:, 0], counts[:, 1]
        rejected = np.minimum(1.0, 2 * sps.binom.cdf(np.minimum(b, c), b + c, 0.5)) < 0.05
        assert abs(rejected.mean() - target) <= 0.03


@pytest.mark.parametrize(("args", "message"), [
    (["--acc", "0.95", "--mde", "0.01"], "plan: --disagreement needed (or --fingerprint for acc and disagreement)"),
    (["--acc", "x", "--disagreement", "0.04", "--mde", "0.01"], "plan: --acc expects a number, got 'x'"),
    (["--acc", "0.99", "--disagreement", "0.04", "--mde", "0.03"], "is impossible"),
    (["--disagreement", "0.04", "--fingerprint", "sha256:ab", "--mde", "0.01"], "not both"),
])  # fmt: skip
def test_plan_bad_input_is_one_line(capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    assert main(["plan", *args]) == 2
    assert message in _error_lines(capsys.readouterr().err)[0]


def test_plan_measures_disagreement_on_past_evaluations(tracking: str, capsys: pytest.CaptureFixture) -> None:
    import numpy as np
    from history_fakes import log_child, predictions
    from mlflow import MlflowClient

    client, labels = MlflowClient(), np.arange(400) % 3
    x_right, y_right = np.arange(400) % 10 != 0, np.arange(400) % 20 != 0  # 90% and 95% right, y on a superset
    for i, (right, identity) in enumerate(zip([x_right, y_right, y_right], ["timm:x", "timm:y", "timm:y"],
                                              strict=True)):  # fmt: skip
        log_child(client, "0", predictions(labels, right), identity=identity, arm=f"arm{i}")
    fingerprint = "sha256:" + "ab" * 16
    assert main(["plan", "--fingerprint", fingerprint, "--mde", "0.02"]) == 0
    out = capsys.readouterr().out
    # x and y differ on 5% of the images; y's second evaluation is left out (a model agrees with itself).
    assert "baseline accuracy 92.50%, A and B differ on 5.00% of test images (1 pair of 2 evaluated models on " \
           f"{fingerprint} (400 images))" in out
    assert main(["plan", "--fingerprint", "sha256:" + "cd" * 16, "--mde", "0.05"]) == 2
    assert "need finished evaluations of at least two models" in capsys.readouterr().err
