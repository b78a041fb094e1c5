"""How fast are `leaderboard` and the reuse lookup over a large tracking store, against one plain search?

    python benchmarks/history_scale.py                     # 1k, 5k, 10k runs (the first call builds the store: ~20 min)
    python benchmarks/history_scale.py --sizes 300 --store /tmp/hs-smoke   # a minute: checks that the script works
    python benchmarks/history_scale.py --old               # also times the previous leaderboard (get_run + parquet)

The store is a SQLite tracking store with local artifacts under --store, filled through the real tracking API
(MlflowClient.create_run / log_batch / log_artifact / set_terminated) over 5 experiments. Each block of 100
runs holds 10 evaluations of one test set (F; 1 in 10 of them logged before predictions/correct.json existed,
so the leaderboard derives its bits from predictions.parquet), 10 parents, 60 evaluations of other test sets,
10 FAILED children on F, 5 children left RUNNING by a dead process (stale) and 5 runs that are not ablab's.
Sizes build on each other (1k, then 4k more, then 5k more) and the store is kept: a later call measures at once.

At each size, every timing is the best of --repeats, in this process (imports and store start-up excluded):
  bare_search_s     one plain paged `search_runs` for F's finished children (the baseline);
  leaderboard_s     `lab.leaderboard.leaderboard` end to end (search, bits, ranking, its own run), empty cache;
  leaderboard_warm_s  the same with the bits cached by run id;
  reuse_s           `lab.history.lookup` for two arms (one found, one not), with the stale-run note;
  stale_note_s      the stale-run search alone, which both include (it grows with the RUNNING runs: 5% here);
  *_cpu_s           CPU seconds of this process for the same call, steadier than wall time on a busy machine.
Prints `history_scale: runs=<n> leaderboard_s=<s> reuse_s=<s> bare_search_s=<s> ...` per size, with
`ratio=<leaderboard_s / bare_search_s>`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FINGERPRINT = "sha256:" + "5e" * 16
PREPROCESS = "size=224 interp=bilinear crop=0.875 mean=0.485,0.456,0.406 std=0.229,0.224,0.225"
MODELS = [f"model{k:02d}" for k in range(20)]
EXPERIMENTS = [f"team-{k}" for k in range(5)]
BLOCK = 100  # runs per block; the mix below sums to it
MIX = [("eval", 9), ("eval_old", 1), ("parent", 10), ("other", 60), ("failed", 10), ("stale", 5), ("foreign", 5)]
LAYOUT = 1  # bump when the mix or the tags change: a kept store of another layout is rebuilt


def identity(model: str) -> str:
    return f"timm:{model}:pretrained=True:classes=10"


def model_of(i: int) -> str:
    """The model of run i: the first draw of its generator."""
    return MODELS[int(np.random.default_rng(i).integers(len(MODELS)))]


def child_tags(kind: str, i: int, model: str, parent: str) -> dict[str, str]:
    """About the 25 tags a real child carries (lab/arm.py), so that the search loads what it would."""
    fingerprint = FINGERPRINT if kind in ("eval", "eval_old", "failed", "stale") else f"sha256:{i % 7:064x}"
    tags = {"mlflow.parentRunId": parent, "mlflow.runName": f"a: {model}", "ab.role": "child", "ab.arm": "a",
            "ab.arm_index": "0", "ab.model": model, "ab.dataset": "digits", "ab.dataset_fingerprint": fingerprint,
            "ab.num_classes": "10", "ab.label_map": "labelmap10", "ab.n_test": "360", "ab.preprocess": PREPROCESS,
            "ab.preprocess_mode": "shared", "ab.model_identity": identity(model), "ab.model_source": "timm",
            "ab.arch": model, "ab.precision": "32", "ab.placement": "lockstep", "ab.seed": "0",
            "ab.deterministic": "true" if i % 2 else "false", "ab.device": "cpu:bench", "ab.batch_size_final": "64",
            "ab.logged_model": f"m-{i:032x}", "ab.logged_model_format": "external", "ab.host": "elsewhere",
            "ab.pid": "1", "ab.heartbeat": "1000000000"}  # a heartbeat from 2001: RUNNING ones are stale
    if kind in ("eval", "eval_old", "other"):
        tags["ab.complete"] = "true"
    return tags


def populate(client, store: Path, start: int, stop: int, n_test: int) -> None:
    """Runs start..stop-1 of the fixed sequence (each block of 100 as MIX says), spread over the experiments."""
    from mlflow.entities import Metric, Param

    from lab import correctness
    from lab.config import flat_params, load_config

    params = {k: v for k, v in flat_params(load_config(None, {})).items() if k not in ("a", "b")}
    kinds = [kind for kind, count in MIX for _ in range(count)]
    experiment_ids = [_experiment(client, name, store) for name in EXPERIMENTS]
    labels = np.arange(n_test) % 10
    parent = ""
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(start, stop):
            kind, exp = kinds[i % BLOCK], experiment_ids[i % len(experiment_ids)]
            rng = np.random.default_rng(i)
            model = MODELS[int(rng.integers(len(MODELS)))]  # as model_of(i)
            if kind in ("parent", "foreign") or not parent:
                tags = {"ab.role": "parent"} if kind != "foreign" else {"team": "someone else"}
                run_id = client.create_run(exp, tags=tags, run_name=f"run {i}").info.run_id
                client.log_batch(run_id, metrics=[Metric("accuracy", float(rng.random()), 0, 0)])
                client.set_terminated(run_id, "FINISHED")
                parent = run_id if kind != "foreign" else parent
                if kind in ("parent", "foreign"):
                    continue
            run_id = client.create_run(exp, tags=child_tags(kind, i, model, parent), run_name=f"a: {model}").info.run_id
            epochs = "2" if i % 5 == 0 else "0"
            metrics = {"test_accuracy": float(rng.uniform(0.8, 0.98)), "latency_ms_p50": float(rng.uniform(1, 9)),
                       "latency_ms_p99": float(rng.uniform(9, 20)),
                       "throughput_img_per_s": float(rng.uniform(1e3, 5e3)),
                       "cpu_rss_peak_mb": float(rng.uniform(500, 900)),
                       **{f"test_accuracy_class.{c}": float(rng.random()) for c in range(10)}}
            client.log_batch(run_id, params=[Param(k, v) for k, v in (params | {"epochs": epochs}).items()],
                             metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
            if kind in ("eval", "eval_old"):
                correct = rng.random(n_test) < metrics["test_accuracy"]
                frame = pd.DataFrame({"sample_id": np.arange(n_test), "label": labels,
                                      "pred": np.where(correct, labels, (labels + 1) % 10),
                                      "confidence": rng.uniform(0.4, 1.0, n_test)})
                path = Path(tmp) / "predictions.parquet"
                frame.to_parquet(path, index=False)
                client.log_artifact(run_id, str(path), "predictions")
                if kind == "eval":
                    client.log_artifact(run_id, str(correctness.write(frame, Path(tmp))), "predictions")
            if kind != "stale":
                client.set_terminated(run_id, "FAILED" if kind == "failed" else "FINISHED")
            if (i + 1) % 1000 == 0:
                print(f"history_scale: populated {i + 1} runs", file=sys.stderr, flush=True)


def _experiment(client, name: str, store: Path) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=(store / "artifacts" / name).as_uri())


def best_of(repeats: int, call, before=None) -> tuple[float, float]:
    """(wall s, CPU s of this process) of the fastest of `repeats` calls; CPU time says what a loaded machine
    hides (other processes' share of the cores)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(times)


def measure(client, store: Path, size: int, repeats: int, old: bool) -> str:
    """One line of timings over the store as it is now."""
    from lab import history, leaderboard, runs
    from lab.compare import fetch_arms
    from lab.config import load_config, unique_names
    from lab.lifecycle import stale_note

    experiments = runs.readable_experiment_ids(client)
    query = f"tags.`ab.role` = 'child' and attributes.status = 'FINISHED' and tags.`ab.dataset_fingerprint` = " \
            f"'{FINGERPRINT}'"

    def bare() -> int:
        count, token = 0, None
        while True:
            page = client.search_runs(experiments, query, max_results=1000, page_token=token)
            count, token = count + len(page), page.token
            if not token:
                return count

    cache = store / "cache"
    cfg = load_config(None, {"data_dir": str(cache), "experiment": "boards"})

    def board() -> None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            leaderboard.leaderboard(cfg, FINGERPRINT)

    # Run 1 is an as-is evaluation of F with deterministic=true (odd), so arm 0 is found; arm 1 never is.
    keys = {0: history.EvalKey(identity(model_of(1)), FINGERPRINT, PREPROCESS, "32", (("epochs", "0"),),
                               deterministic="true"),
            1: history.EvalKey(identity("never-evaluated"), FINGERPRINT, PREPROCESS, "32", (("epochs", "0"),))}
    found = {}

    def reuse() -> None:
        found.update(history.lookup(client, keys)[0])

    (bare_s, bare_cpu) = best_of(repeats, bare)
    stale_s, _ = best_of(repeats, lambda: stale_note(client, experiments, FINGERPRINT))
    board_s, board_cpu = best_of(repeats, board, before=lambda: shutil.rmtree(cache, ignore_errors=True))
    warm_s, _ = best_of(repeats, board)
    reuse_s, _ = best_of(repeats, reuse)
    line = (f"history_scale: runs={size} leaderboard_s={board_s:.2f} reuse_s={reuse_s:.2f} bare_search_s={bare_s:.2f} "
            f"leaderboard_warm_s={warm_s:.2f} leaderboard_cpu_s={board_cpu:.2f} bare_search_cpu_s={bare_cpu:.2f} "
            f"stale_note_s={stale_s:.2f} evaluations={bare()} reused={sorted(found)} ratio={board_s / bare_s:.2f}")
    if old:  # the previous leaderboard: get_run and predictions.parquet per evaluation
        def previous() -> None:
            hits = runs.search_children(client, f"tags.`ab.dataset_fingerprint` = '{FINGERPRINT}'", experiments)
            arms = fetch_arms(client, [r.info.run_id for r in hits], unique_names([r.info.run_id[:8] for r in hits]))
            leaderboard.leaderboard_table(arms)

        line += f" old_leaderboard_s={best_of(1, previous)[0]:.2f}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000", help="total runs in the store at each measurement")
    parser.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "ablab-history-scale"),
                        help="where the store is built and kept between calls")
    parser.add_argument("--n_test", type=int, default=360, help="test samples per evaluation (digits: 360)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old", action="store_true", help="also time the previous leaderboard (slow)")
    args = parser.parse_args()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    import mlflow

    store = Path(args.store).resolve()
    manifest = store / "manifest.json"
    state = json.loads(manifest.read_text()) if manifest.exists() else {}
    if state.get("layout") != LAYOUT or state.get("n_test") != args.n_test:
        shutil.rmtree(store, ignore_errors=True)
        state = {"layout": LAYOUT, "n_test": args.n_test, "runs": 0}
    store.mkdir(parents=True, exist_ok=True)
    base = mlflow.MlflowClient(f"sqlite:///{store / 'base.db'}")  # grows; each size is measured on a copy
    for size in sorted(int(s) for s in args.sizes.split(",")):
        snapshot = store / f"runs-{size}"
        if not (snapshot / "mlflow.db").exists():
            if size < state["runs"]:
                print(f"history_scale: {store} already holds {state['runs']} runs and no copy at {size}; skipping "
                      "it (use another --store)", file=sys.stderr)
                continue
            start = time.perf_counter()
            populate(base, store, state["runs"], size, args.n_test)
            print(f"history_scale: populated {state['runs']}..{size} in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
            state["runs"] = size
            manifest.write_text(json.dumps(state))
            snapshot.mkdir(exist_ok=True)
            with sqlite3.connect(store / "base.db") as src, sqlite3.connect(snapshot / "mlflow.db") as dst:
                src.backup(dst)  # the runs' artifacts stay where the base store put them (read only from here)
        uri = os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{snapshot / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        os.chdir(snapshot)  # the leaderboard's own runs keep their artifacts in the copy
        print(measure(mlflow.MlflowClient(uri), snapshot, size, args.repeats, args.old), flush=True)


if __name__ == "__main__":
    main()
