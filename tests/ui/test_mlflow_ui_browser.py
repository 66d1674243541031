"""The MLflow UI shows what a pipeline run logged: checked in a real browser (headless Chromium).

One cheap stage (`data`, arithmetic only) runs through the real CLI into a fresh workspace,
the MLflow server starts on that workspace's mlflow.db, and Selenium walks the screens a
person would: the experiment list, the experiment's runs with the parent run expanded to its
nested stage run, the stage run's page and its "Model metrics" tab with a rendered chart.

Selectors are for the UI of mlflow==3.17.2 (pinned in pyproject.toml): run links are found by
their href (run ids come from MlflowClient), the metrics tab by its aria-controls, the charts by
their data-testid and the Plotly elements the UI draws them with.

Screenshots go to the test's tmp dir and to test-artifacts/mlflow-ui/ (kept by CI), also when a
step fails (failure.png and failure.html).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli import DATA_ONLY, ROOT, clean_env, free_port
from mlflow_server import start_server, stop, wait_until_up

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "test-artifacts" / "mlflow-ui"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)",
    ),
]

METRIC = "packing_efficiency"  # logged by the data stage; a top-level name, so its chart title is the full name
METRICS_TAB = '[role="tab"][aria-controls$="-content-model-metrics"]'  # the run page's "Model metrics" tab
WAIT = 60  # seconds, for any one thing to appear in the browser


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    return driver


def test_the_mlflow_ui_shows_the_parent_run_its_stage_run_and_a_metric_chart(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.time()
    marks: dict[str, float] = {}  # seconds since the start, printed at the end (pytest -s shows them)

    def mark(name: str) -> None:
        marks[name] = round(time.time() - started, 1)

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    db = workspace / "mlflow.db"
    uri = f"sqlite:///{db}"

    # The schema is created here first, so the server and the pipeline (started together below,
    # to overlap their start-up) never both create the tables.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    client.search_experiments()
    mark("schema")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "mlflow-server.log"
    server = start_server(db, port, server_log)
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "conf=tiny", *DATA_ONLY],
        cwd=workspace,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    browser: dict = {}

    def start_browser() -> None:  # meanwhile: Chromium's start-up overlaps the pipeline's too
        try:
            browser["driver"] = _browser()
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            browser["error"] = err

    starter = threading.Thread(target=start_browser, daemon=True)
    starter.start()
    driver = None
    try:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, (out + err)[-5000:]
        mark("pipeline")

        experiment = client.get_experiment_by_name("ernie-pipeline")
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        (stage,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.run_name.startswith("tiny-") and parent.info.run_id in out
        assert stage.info.run_name == "data" and stage.info.status == "FINISHED"
        value = stage.data.metrics[METRIC]
        exp, parent_id, stage_id = experiment.experiment_id, parent.info.run_id, stage.info.run_id

        wait_until_up(url, server, server_log, timeout=180)
        mark("server")
        starter.join(timeout=WAIT)
        mark("browser")
        driver = browser.get("driver")
        assert driver is not None, f"headless Chromium did not start: {browser.get('error', 'timed out')!r}"
        wait = WebDriverWait(driver, WAIT)

        # 1. the experiment list names the pipeline's experiment, linked to its page
        driver.get(f"{url}/#/experiments")
        link = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, f'a[href="#/experiments/{exp}"]')))
        assert link.text == "ernie-pipeline"
        driver.save_screenshot(str(shots / "1-experiments.png"))
        mark("experiments")

        # 2. its runs: the parent run by its CLI name; expanding it shows the nested stage run
        driver.get(f"{url}/#/experiments/{exp}/runs")
        parent_link = wait.until(
            EC.visibility_of_element_located((By.CSS_SELECTOR, f'a[href="#/experiments/{exp}/runs/{parent_id}"]'))
        )
        assert parent_link.text == parent.info.run_name
        stage_links = (By.CSS_SELECTOR, f'a[href="#/experiments/{exp}/runs/{stage_id}"]')
        if not driver.find_elements(*stage_links):  # children start collapsed under their parent
            cell = parent_link.find_element(By.XPATH, './ancestor::div[@role="gridcell"]')
            cell.find_element(By.TAG_NAME, "button").click()  # the row's expander, the cell's only button
        stage_link = wait.until(EC.element_to_be_clickable(stage_links))
        assert stage_link.text == "data"
        driver.save_screenshot(str(shots / "2-runs-nested.png"))
        mark("runs")

        # 3. the stage run's page: its name, and a link back to its parent run
        stage_link.click()
        wait.until(EC.url_contains(f"/runs/{stage_id}"))
        metrics_tab = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, METRICS_TAB)))  # the run page is up
        back = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, f'a[href$="/runs/{parent_id}"]')))
        assert back.text == parent.info.run_name  # "Parent run" on the stage run's overview
        driver.save_screenshot(str(shots / "3-stage-run.png"))
        mark("stage run")

        # 4. its metrics: the chart of one metric, drawn (a Plotly trace) and titled with its name
        metrics_tab.click()
        search = (By.CSS_SELECTOR, 'input[role="searchbox"][placeholder="Search metric charts"]')
        wait.until(EC.element_to_be_clickable(search)).send_keys(METRIC)
        card = wait.until(
            EC.visibility_of_element_located(
                (
                    By.XPATH,
                    f'//*[@data-testid="experiment-view-compare-runs-card"][.//h4[@title="{METRIC}"]]',
                )
            )
        )
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
        wait.until(lambda _: card.find_elements(By.CSS_SELECTOR, ".js-plotly-plot svg.main-svg g.trace"))
        title = card.find_element(By.TAG_NAME, "h4")
        assert title.is_displayed() and title.text == METRIC
        labels = [t.text for t in card.find_elements(By.CSS_SELECTOR, "g.trace text")]
        assert f"{value:.2f}" in labels, (labels, value)  # the bar carries the logged value
        driver.save_screenshot(str(shots / "4-metric-chart.png"))
        card.screenshot(str(shots / "5-metric-card.png"))
        mark("chart")
        print(f"seconds since the start: {marks}")
    except BaseException:
        if driver is not None:
            driver.save_screenshot(str(shots / "failure.png"))
            (shots / "failure.html").write_text(driver.page_source)
        raise
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        starter.join(timeout=WAIT)
        if browser.get("driver") is not None:
            browser["driver"].quit()
        stop(server)
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for png in shots.iterdir():
            shutil.copy(png, ARTIFACTS / png.name)
