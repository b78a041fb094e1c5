"""The MLflow UI shows what ablab logged: headless Chromium (selenium) against a real `mlflow server`.

The runs page lists the parent, named `<a> vs <b>`, with its test set in the Dataset column and its arms nested
under it (expanded by the row's toggle); the experiment's Models view (model training) lists every arm's model
with its accuracy on that test set; the artifact view renders comparison/report.html (in an iframe) with the
verdict. Screenshots go to $AB_TEST_OUTPUTS (default: the test's tmp dir) as ui_runs.png, ui_models.png and
ui_report.png. Skipped, with the reason, where Chromium or its driver is missing (Debian: apt-get install -y
chromium chromium-driver; scripts/ci_services.sh does it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from history_fakes import FINGERPRINT, correct_mask, log_child, predictions
from mlflow_servers import Server, start_server

from lab import lineage
from lab.compare import analyse, fetch_arms
from lab.config import load_config
from lab.experiment import log_comparison
from lab.report import describe

pytestmark = pytest.mark.slow
WAIT_S = 90


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, str, str]]:
    """(server, experiment id, parent run id, verdict sentence): a parent with two nested arms and its report; each
    arm's test set, model and linked metrics as lab/arm.py logs them, the parent's test set as experiment.py does."""
    root = tmp_path_factory.mktemp("ui-server")
    server = start_server(root, f"sqlite:///{root}/mlflow.db")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.uri)
    try:
        client = mlflow.MlflowClient(server.uri)
        experiment = client.create_experiment("ui")
        parent = client.create_run(experiment, tags={"ab.role": "parent"},
                                   run_name="resnet10t vs mobilenetv3_small_100").info.run_id
        n = 120
        labels = np.arange(n) % 3
        right_a = correct_mask(n, 0.6, 1)
        cfg = load_config(None, {"n_resamples": "500", "data": "fake"})
        test = lineage.split_dataset(cfg, FINGERPRINT, n, ("0", "1", "2"))
        runs = []
        for arm, model, right in (("a", "resnet10t", right_a),
                                  ("b", "mobilenetv3_small_100", right_a | correct_mask(n, 0.4, 2))):
            run = log_child(client, experiment, predictions(labels, right), parent_run_id=parent, model=model, arm=arm,
                            status="RUNNING")
            lineage.log_datasets(client, run, {"test": test})
            model_id = lineage.link_external_model(client, run, experiment, model, {"ablab.pretrained": "false"})
            lineage.log_linked_metrics(client, run, {"test_accuracy": right.mean(), "latency_ms_p50": 1.5}, model_id,
                                       test)
            client.set_terminated(run, "FINISHED")
            runs.append(run)
        lineage.copy_test_input(client, runs[0], parent)
        summary = describe(analyse(cfg, fetch_arms(client, runs, ["a", "b"])))
        log_comparison(client, parent, cfg, summary, Path(tempfile.mkdtemp(dir=root)) / "comparison")
        client.set_terminated(parent, "FINISHED")
        yield server, experiment, parent, summary["sentence"]
    finally:
        mlflow.set_tracking_uri(previous)
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Chromium or chromedriver not found; install them: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (it is in the test extras)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1800,1000"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = Path(os.environ.get("AB_TEST_OUTPUTS") or tmp_path_factory.mktemp("test-outputs"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _wait(chrome):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(chrome, WAIT_S)


def test_runs_page_shows_the_parent_with_its_test_set_and_its_arms_nested(logged, browser, outputs: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    server, experiment, parent, _ = logged
    browser.get(f"{server.uri}/#/experiments/{experiment}/runs")
    parent_link = _wait(browser).until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, f"a[href$='/runs/{parent}']")))
    assert "resnet10t vs mobilenetv3_small_100" in parent_link.text
    dataset = f"fake ({lineage.digest(FINGERPRINT)})"  # the Dataset column: name and digest of the test set
    assert browser.find_elements(By.CSS_SELECTOR, f"span[title='{dataset}']")
    for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        close.click()  # the assistant side panel, where it opens by itself
    assert not browser.find_elements(By.XPATH, "//*[text()='a: resnet10t']")  # collapsed: arms hidden
    toggle = _wait(browser).until(ec.element_to_be_clickable(
        (By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']")))  # the parent row's expander
    toggle.click()
    for arm in ("a: resnet10t", "b: mobilenetv3_small_100"):
        _wait(browser).until(ec.visibility_of_element_located((By.XPATH, f"//*[text()='{arm}']")))
    _wait(browser).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, f"span[title='{dataset}']")) == 3)
    browser.save_screenshot(str(outputs / "ui_runs.png"))
    assert (outputs / "ui_runs.png").stat().st_size > 10_000


def test_models_view_lists_every_arm_with_its_accuracy_on_the_test_set(logged, browser, outputs: Path) -> None:
    """The experiment's Models view (model training): one row per arm's model, a test_accuracy column per dataset."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    server, experiment, _, _ = logged
    browser.get(f"{server.uri}/#/experiments/{experiment}/models?workflowType=machine_learning")
    # A metric's column id names the metric and the dataset (name and digest) it was measured on.
    digest = lineage.digest(FINGERPRINT)
    column = f"div[role='gridcell'][col-id^='metrics.'][col-id*='test_accuracy'][col-id*='{digest}']"
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, "a[href*='/models/m-']")))
    for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        close.click()  # the assistant side panel, where it opens by itself
    # The grid draws only the columns in view: the metrics sit right of the models' attributes.
    browser.execute_script("document.querySelectorAll('.ag-center-cols-viewport, .ag-body-horizontal-scroll-viewport')"
                           ".forEach(e => e.scrollLeft = e.scrollWidth)")
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, column)))

    def cells(css: str) -> dict[str, str]:  # row index -> text (ag-grid renders a row's columns in parts)
        return {c.find_element(By.XPATH, "./ancestor::div[@role='row']").get_attribute("row-index"): c.text
                for c in browser.find_elements(By.CSS_SELECTOR, css)}

    names = cells("a[href*='/models/m-']")
    accuracy = cells(column)
    assert {names[row]: accuracy[row] for row in names} == {"resnet10t": "0.6", "mobilenetv3_small_100": "0.775"}
    browser.save_screenshot(str(outputs / "ui_models.png"))
    assert (outputs / "ui_models.png").stat().st_size > 10_000


def test_report_html_renders_with_the_verdict(logged, browser, outputs: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    server, experiment, parent, sentence = logged
    browser.get(f"{server.uri}/#/experiments/{experiment}/runs/{parent}/artifacts/comparison/report.html")
    frame = _wait(browser).until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
    browser.switch_to.frame(frame)
    try:
        verdict = _wait(browser).until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".verdict")))
        assert verdict.text == sentence and "is better than" in sentence
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith("ablab comparison:")
        assert len(browser.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png;base64,']")) >= 3
    finally:
        browser.switch_to.default_content()
    browser.save_screenshot(str(outputs / "ui_report.png"))
    assert (outputs / "ui_report.png").stat().st_size > 10_000
