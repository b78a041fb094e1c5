"""One parent run from start to end: preflight, the arms (reused, or launched as child runs), the comparison,
its logging, registration of the arms' models and the promotion gate.

    python -m lab run ...       ->  experiment.run(cfg)
    python -m lab compare ...   ->  lab/compare_runs.py resolves its inputs into a Job, then experiment.conduct(job)

Everything that can be wrong with the input is raised (as a one-line ValueError) before the parent run exists;
from then on `runs.parent_run` ends the run FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag

from lab import history, launch, lifecycle, lineage, outage, registry, report, runs, spool, zygote
from lab.compare import Arm, analyse, fetch_arms, parent_metrics
from lab.config import Config, flat_params, load_config
from lab.launch import Plan


@dataclass(frozen=True)
class Job:
    """One comparison to conduct in a new parent run.

    Arm i is `known[i]` (fetched before the parent: `compare` checks those agree first), else the child run
    `reused[i]`, else evaluated here as a child of the parent, placed by `plan`.
    """

    cfg: Config
    names: list[str]  # arm names, baseline first
    run_name: str
    tags: dict[str, str]  # the parent's tags before the comparison adds its own
    plan: Plan | None  # None when no arm is evaluated here
    reused: dict[int, Run] = field(default_factory=dict)
    known: dict[int, Arm] = field(default_factory=dict)
    announce: str = ""  # printed, with the parent run id, once the parent exists
    link_sources: bool = False  # tag and note the experiment and run of every compared arm (`compare`)

    @property
    def todo(self) -> list[int]:
        """Indices of the arms evaluated in this job."""
        return [i for i in range(len(self.names)) if i not in self.known and i not in self.reused]


@dataclass(frozen=True)
class Outcome:
    run_id: str
    experiment_id: str
    summary: dict[str, Any]


def preflight(cfg: Config, indices: Sequence[int], server: zygote.Zygote | None = None) -> Probe:
    """Everything about the arms at `indices` that can be checked before a run exists: model specs, and the
    dataset (downloaded once, here, rather than by every arm). What needs torch and timm (the model specs, the
    identity and input pipeline each arm would record, the CUDA devices) runs in a process forked from the arms'
    fork server where there is one (it has them loaded), so that this process never imports them."""
    from lab import data

    found = None
    # A caller that has timm loaded already (in-process, as the tests call `run`) checks here: asking the server
    # would only wait for its imports.
    if server is not None and "timm" not in sys.modules:
        with tempfile.TemporaryDirectory(prefix="ablab-probe-") as tmp, ThreadPoolExecutor(2) as pool:
            cfg_path = Path(tmp) / "config.yaml"
            cfg_path.write_text(cfg.to_yaml())
            pool.submit(launch.prepare, cfg)
            asked = pool.submit(server.call, "lab.models.resolve:probe",
                                {"config_path": str(cfg_path), "indices": list(indices)}, launch.job_env(server.base))
            # Meanwhile, while the server is still importing: a new store's schema, and this process's copy of
            # the dataset (the probe resolves it too, for the class count), not one after the other.
            runs.open_store()
            try:
                data.resolve_dataset(cfg)
            except Exception:
                asked.result()  # a bad model spec is said first, as without the server
                raise
            found = asked.result()
    if found is None:  # no server (compare, Ray, AB_NO_STANDBY=1, not Linux), or it died: here
        from lab import models  # torch

        found = models.probe_here(cfg, list(indices))  # resolves the dataset here too
    data.test_groups(cfg)  # a groups CSV that misses test samples is bad input: say so before any run
    return Probe({int(i): (identity, pre) for i, (identity, pre) in found["expected"].items()}, found["cuda_devices"])


@dataclass(frozen=True)
class Probe:
    expected: dict[int, tuple[str | None, str | None]]  # arm index -> identity and preprocess it would record
    cuda_devices: int


def run(cfg: Config) -> Outcome:
    """`python -m lab run`: every arm evaluated here (or reused), compared in one parent run."""
    with launch.standby(cfg, len(cfg.arm_specs)) as server:  # the arms' imports run while this process goes on
        return _run(cfg, server)


def _run(cfg: Config, server: zygote.Zygote | None = None) -> Outcome:
    n = len(cfg.arm_specs)
    probe = preflight(cfg, range(n), server)
    p = launch.plan(cfg, n, launch.visible_gpus(cfg, probe.cuda_devices))
    # arm index -> finished child run that evaluated it the same way
    reused = history.reusable_arms(cfg, expected=probe.expected)
    tags = {"ab.role": "parent", "ab.placement": p.placement, "ab.device_kind": p.device,
            **({"ab.aa_test": "true"} if cfg.aa_test else {}),  # every arm the same model: an A/A test
            **({"ab.allow_pickle_models": "true"} if cfg.allow_pickle_models else {}),
            "ab.arms": ",".join(cfg.arm_names)}
    announce = f"ablab: {n} arms ({', '.join(cfg.arm_inputs)}) on {p.device}, placement={p.placement}"
    outcome = conduct(Job(cfg, list(cfg.arm_names), runs.run_name(cfg.arm_inputs), tags, p, reused, announce=announce))
    print(outcome.summary["sentence"])
    print(f"ablab: verdict {outcome.summary['verdict']}; report: comparison/report.html in run {outcome.run_id} "
          f"(mlflow ui --backend-store-uri {runs.tracking_uri()}, then "
          f"#/experiments/{outcome.experiment_id}/runs/{outcome.run_id})", file=sys.stderr)
    return outcome


def conduct(job: Job) -> Outcome:
    """The parent run: config, the arms, the comparison (metrics, tags, report), promotion; never left RUNNING."""
    cfg = job.cfg
    client = outage.patient(MlflowClient(), cfg.outage_window_s)  # a lost server is waited for, then spooled
    with runs.parent_run(cfg.experiment, job.run_name) as run, spool.for_job(client, cfg, run, job.names,
                                                                            job.run_name):
        run_id = run.info.run_id
        # Prefixed: `mlflow run` has already logged the raw -P values ("" = from the YAML) under the plain names.
        mlflow.log_params({f"config.{k}": v for k, v in flat_params(cfg).items()})
        mlflow.set_tags(job.tags)
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        with tempfile.TemporaryDirectory(prefix="ablab-") as tmp:
            if job.announce:
                print(f"{job.announce}; parent run {run_id}", file=sys.stderr)
            arms = collect_arms(client, run, job, Path(tmp))
            history.mark_reused(client, run_id, arms, job.reused)
            lineage.copy_test_input(client, arms[0].run_id, run_id)  # the parent is found by its test set too
            summary = report.describe(analyse(cfg, arms, class_names(cfg, arms), groups=test_groups(cfg)))
            log_comparison(client, run_id, cfg, summary, Path(tmp) / "comparison")
            if job.link_sources:
                link_sources(client, run_id, summary, arms)
            versions = registry.register_arms(client, run_id, cfg.register, arms) if cfg.register else {}
            if cfg.promote_alias:
                registry.promote(client, run_id, cfg.promote_alias, summary, arms, versions.get(len(arms) - 1))
    return Outcome(run_id, run.info.experiment_id, summary)


def collect_arms(client, parent: Run, job: Job, tmp: Path) -> list[Arm]:
    """Every arm in order: evaluate the job's todo as child runs of `parent`, then fetch what is not known."""
    outcomes = []
    if job.todo:
        cfg_path = tmp / "config.yaml"
        cfg_path.write_text(job.cfg.to_yaml())
        outcomes = launch.run_arms(job.cfg, cfg_path, parent.info.run_id, parent.info.experiment_id, job.plan,
                                   job.todo)
        failed = [o for o in outcomes if o.returncode != 0 or o.run_id is None]
        if failed:
            raise runs.RunFailed("; ".join(o.error or f"arm {o.name} failed" for o in failed))
    run_ids = {o.index: o.run_id for o in outcomes} | {i: r.info.run_id for i, r in job.reused.items()}
    missing = [i for i in range(len(job.names)) if i not in job.known]
    fetched = fetch_arms(client, [run_ids[i] for i in missing], [job.names[i] for i in missing])
    add_params(client, fetched)
    arms = job.known | dict(zip(missing, fetched, strict=True))
    return [arms[i] for i in range(len(job.names))]


def add_params(client, arms: list[Arm]) -> None:
    """Each arm's recorded config (`extra["params"]`): the guard names the setting (seed, test_fraction, data)
    that gave two arms different test sets."""
    for arm in arms:
        if "params" not in arm.extra:  # fetch_arms records them: no second get_run
            arm.extra["params"] = dict(client.get_run(arm.run_id).data.params)


def test_groups(cfg: Config) -> dict[int, str] | None:
    """sample_id -> group of the test set when the config asks for clustered analysis (group_by, groups)."""
    if cfg.group_by == "none" and not cfg.groups:
        return None
    from lab import data  # torch: only when groups are asked for

    return data.test_groups(cfg)


# Up to this many test images the parent may resolve the dataset itself (it imports torch, and scans or hashes
# the data: seconds at CIFAR's 10,000, far more at ImageNet's 50,000): for the flips gallery, and for the class
# names of runs that did not log them.
LOCAL_DATA_MAX_N = 10_000


def class_names(cfg: Config, arms: list[Arm]) -> tuple[str, ...] | None:
    """The class names the baseline arm logged (checked against its label map: no dataset, no torch); for older
    runs, the dataset's when it resolves here, is small, and is the arms' very test set; else None (indices)."""
    if arms[0].extra.get("class_names"):
        return tuple(arms[0].extra["class_names"])
    if len(arms[0].predictions) > LOCAL_DATA_MAX_N:
        return None
    from lab.data import resolve_dataset  # torch: `compare` of existing runs may not need it otherwise

    try:
        info = resolve_dataset(cfg)
    except Exception:  # names are a nicety; a dataset absent on this machine is fine
        return None
    return info.class_names if info.fingerprint == arms[0].tags.get("ab.dataset_fingerprint") else None


def log_comparison(client, parent_run_id: str, cfg: Config, summary: dict[str, Any], out_dir: Path) -> None:
    """Metrics in one batch, verdict tags, and the rendered report under `comparison/` (summary.json, and the full
    per-class, confusion and flip tables as Parquet)."""

    def gallery(ids: list[int]) -> list:
        try:
            from lab.data import test_images  # torch: only when the report shows flipped samples

            return test_images(cfg, ids, fingerprint=summary["fingerprint"])
        except Exception:  # a gallery is a nicety: a dataset that fails to load leaves it out
            return []

    report.render(summary, out_dir, gallery=gallery if summary["n"] <= LOCAL_DATA_MAX_N else None)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in parent_metrics(summary).items()]
    tags = [
        RunTag("ab.role", "parent"),
        RunTag("ab.verdict", summary["verdict"]),
        RunTag("ab.verdict_sentence", summary["sentence"][: runs.MAX_TAG]),
        RunTag("ab.dataset_fingerprint", str(summary["fingerprint"])),
        RunTag("ab.preprocess_differs", str(summary["preprocess_differs"]).lower()),
        RunTag("ab.latency_comparable", str(summary["latency"]["comparable"]).lower()),
        RunTag("mlflow.note.content", f"**{summary['sentence']}**\n\nSee artifacts: comparison/report.html"),
    ]
    if len(summary["pairs"]) > 1:
        tags += [RunTag(f"ab.verdict.{p['key']}", p["verdict"]) for p in summary["pairs"]]
    tags += [RunTag(f"ab.child.{a['name']}", a["run_id"]) for a in summary["arms"]]
    for start in range(0, len(metrics), 1000):
        client.log_batch(parent_run_id, metrics=metrics[start : start + 1000], tags=tags if start == 0 else [])
    (out_dir / "summary.json").write_text(runs.strict_json(summary, indent=1))  # NaN -> null: valid JSON
    client.log_artifacts(parent_run_id, str(out_dir), "comparison")


def link_sources(client, run_id: str, summary: dict[str, Any], arms: list[Arm]) -> None:
    """Tags and a note linking every compared run (experiment and run id) from the new parent."""
    tags, lines = [RunTag("ab.compared_runs", ",".join(arm.run_id for arm in arms))], []
    for arm in arms:
        experiment = client.get_run(arm.run_id).info.experiment_id
        tags.append(RunTag(f"ab.source.{arm.name}", f"{experiment}/{arm.run_id}"))
        lines.append(f"- {arm.name}: [{arm.spec}](#/experiments/{experiment}/runs/{arm.run_id})")
    note = f"**{summary['sentence']}**\n\nCompared runs:\n" + "\n".join(lines)
    tags.append(RunTag("mlflow.note.content", note + "\n\nSee artifacts: comparison/report.html"))
    client.log_batch(run_id, tags=tags)


def resume(folder: str) -> Outcome | None:
    """`python -m lab resume <dir>`, once the tracking server is back: finish a job that lost it, from the spool
    folder its last line named. Each arm's kept results are uploaded, verified and its child run completed; then
    the comparison is conducted in the job's own parent run, which ends FINISHED. An arm that lost the server
    before its predictions existed ends FAILED, and the parent FAILED naming it (a new `run` evaluates it again
    and reuses the complete arms). A second call finds the parent finished and says so."""
    job, path = spool.read_job(folder), Path(folder).expanduser()
    os.environ["MLFLOW_TRACKING_URI"] = job["tracking_uri"]  # where the job's runs are, whatever is set here
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded file is noise
    mlflow.set_tracking_uri(job["tracking_uri"])
    client, parent_id, names = MlflowClient(), job["parent_run_id"], list(job["names"])
    with runs.reading_runs():  # the server still away: one line, nothing changed
        parent = client.get_run(parent_id)
        if parent.info.status == "FINISHED" and parent.data.tags.get("ab.verdict"):
            print(f"ablab: parent run {parent_id} is finished already (verdict {parent.data.tags['ab.verdict']}); "
                  "nothing to resume", file=sys.stderr)
            return None
        done, problems = spool.settle_arms(client, path, job)
    if problems:
        line = (f"resume: {'; '.join(problems)} (`python -m lab run` evaluates them again and reuses the complete "
                "arms)")
        lifecycle.end_run(client, parent_id, line, "FAILED")
        raise runs.RunFailed(line)
    (path / "config.yaml").write_text(job["config"])
    cfg = load_config(path / "config.yaml")
    arms = fetch_arms(client, [done[i] for i in range(len(names))], names)
    add_params(client, arms)
    if "ab.error" in parent.data.tags:  # ended FAILED by the lost job, or by `doctor --fix`
        client.delete_tag(parent_id, "ab.error")
    spool.mark(path, resuming=True)
    os.environ["MLFLOW_RUN_ID"] = parent_id  # runs.parent_run reopens it, as under `mlflow run`
    try:
        outcome = conduct(Job(cfg, names, job["run_name"], {"ab.resumed_from": str(path)}, None,
                              known=dict(enumerate(arms))))
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)
    spool.mark(path, resuming=False, finished=True)
    print(outcome.summary["sentence"])
    print(f"ablab: resumed parent run {parent_id} from {path}: verdict {outcome.summary['verdict']}", file=sys.stderr)
    return outcome
