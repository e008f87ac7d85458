"""The MLflow UI, used as a person uses it: a real `mlflow server` over a database holding a finished
sweep (its runs table, report, logged models and a run's data sets), opened in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium).

A browser that cannot start fails this test (the Makefile installs selenium; .ci/run installs Chromium).
RLHF_EXP_UI_SCREENSHOT=<file.png> keeps the screenshot; it is always saved in the test's folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from helpers import mlflow_runs, run_cli, tracked_env
from rlhf_exp.tracking.mlflow_tracker import ui_address
from rlhf_exp.tracking.server import MlflowServer

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1700,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def wait_for(driver, find, timeout_s: float = 90.0, what: str = ""):
    """`find(driver)` once it returns something truthy; the page text in the error if it never does."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            found = find(driver)
            if found:
                return found
        except Exception:  # the page is still rendering
            pass
        time.sleep(0.5)
    raise AssertionError(f"not on the page after {timeout_s:.0f} s: {what}\n"
                         + driver.find_element("tag name", "body").text[:3000])


def click(driver, xpath: str, what: str) -> None:
    """Click the first shown element matching `xpath`, once the page lets it be clicked."""
    from selenium.webdriver.common.by import By

    def clicked(d) -> bool:
        for element in d.find_elements(By.XPATH, xpath):
            if element.is_displayed():
                element.click()
                return True
        return False

    wait_for(driver, clicked, what=what)


def row_cells(driver, run_name: str) -> dict[str, str]:
    """{column id: text} of the runs-table row showing `run_name` (the grid renders its pinned name column
    and the other columns as separate row elements sharing a row-index; cells carry their column's id,
    e.g. params.`stage.beta`)."""
    from selenium.webdriver.common.by import By

    link = driver.find_element(By.XPATH, f"//a[.//span[text()='{run_name}']]")
    index = link.find_element(By.XPATH, "./ancestor::*[@row-index][1]").get_attribute("row-index")
    return {cell.get_attribute("col-id"): cell.text
            for cell in driver.find_elements(By.CSS_SELECTOR, f"[row-index='{index}'] [col-id]")}


def test_a_finished_sweep_in_the_mlflow_ui_shows_its_children_swept_param_objective_and_report(tmp_path):
    from selenium.webdriver.common.by import By

    env = {**tracked_env(tmp_path), "RLHF_EXP_MULTIRUNS_DIR": str(tmp_path / "multi")}
    done = run_cli("-m", "experiment=quick", "stage=dpo", "stage.max_steps=1", "stage.eval_every=1",
                   "stage.beta=0.05,0.3", "hardware.num_threads=1", "tracking.log_model=true", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path / "m.db")
    [parent] = [r for r in runs if r.data.tags.get("rlhf_exp.role") == "sweep"]
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert sorted(children) == ["dpo beta=0.05", "dpo beta=0.3"]
    view = parent.data.tags["ui_view"]  # the runs table as the sweep saved it
    assert view.startswith(f"/#/experiments/{parent.info.experiment_id}/runs?viewStateShareKey=")
    assert view in done.stdout

    server = MlflowServer(f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "mlartifacts"),
                          log_path=tmp_path / "server.log")
    driver = browser()
    shot = tmp_path / "mlflow_ui_sweep.png"
    try:
        driver.get(server.uri + view)
        wait_for(driver, lambda d: d.find_element(By.XPATH, "//span[text()='dpo sweep: beta']"), what="the parent run")
        # the printed view opens on the model-training side: its sidebar has the Model registry, not GenAI's Traces
        wait_for(driver, lambda d: d.find_element(By.XPATH, "//*[text()='Model registry']"), what="the training side")
        headers = wait_for(driver, lambda d: {h.text for h in d.find_elements(By.CSS_SELECTOR, "[role=columnheader]")}
                           >= {"objective", "stage.beta"} and {h.text for h in d.find_elements(
                               By.CSS_SELECTOR, "[role=columnheader]")}, what="the objective and stage.beta columns")
        assert "eval/implicit_accuracy" in headers
        # the jobs listed beside the parent, no expander to click, best objective first (ties: either order)
        wait_for(driver, lambda d: d.find_element(By.XPATH, "//span[text()='dpo beta=0.3']"), what="the children")
        listed = [e.text for e in driver.find_elements(By.XPATH, "//span[starts-with(text(), 'dpo beta=')]")]
        by_objective = sorted(children, key=lambda n: -children[n].data.metrics["objective"])
        assert sorted(listed) == sorted(children) and (listed == by_objective or len(
            {children[n].data.metrics["objective"] for n in children}) == 1), (listed, by_objective)
        for name, run in children.items():
            cells = row_cells(driver, name)
            assert cells["params.`stage.beta`"] == run.data.params["stage.beta"], cells
            assert float(cells["metrics.`objective`"]) == run.data.metrics["objective"], cells
        driver.save_screenshot(str(shot))

        # the comparison report, logged to the parent run
        driver.get(f"{server.uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}/artifacts")
        click(driver, "//*[text()='report']", "the report folder")
        click(driver, "//*[text()='report.md']", "report.md")
        # rendered as markdown: the table's rows are the viewer's table rows
        rows = wait_for(driver, lambda d: [[c.text for c in row.find_elements(By.CSS_SELECTOR, "[role=cell]")]
                                           for row in d.find_elements(By.CSS_SELECTOR, "[role=row]:has([role=cell])")],
                        what="the report's table")
        assert [row[:3] for row in rows] == [["dpo beta=0.05", "FINISHED", "0.05"], ["dpo beta=0.3", "FINISHED", "0.3"]]
        driver.save_screenshot(str(tmp_path / "mlflow_ui_report.png"))

        # MLflow 3's Models tab: each child's final policy, from its run. The address asks for the UI's model-training
        # side (it opens on GenAI's otherwise), as every address the project prints does
        driver.get(ui_address(server.uri, f"/experiments/{parent.info.experiment_id}/models"))
        for name in children:  # each model is named as its run (MLflow refuses "." in it), its source run linked
            wait_for(driver, lambda d: d.find_element(By.XPATH, f"//a[text()='{name.replace('.', '_')}']"),
                     what=f"{name}'s model")
            wait_for(driver, lambda d: d.find_element(By.XPATH, f"//a[text()='{name}']"), what=f"{name} as its source")
        driver.save_screenshot(str(tmp_path / "mlflow_ui_models.png"))
        # a child's page: its description, and its data as run inputs (the Datasets section)
        child = children["dpo beta=0.3"]
        driver.get(ui_address(server.uri, f"/experiments/{parent.info.experiment_id}/runs/{child.info.run_id}"))
        wait_for(driver, lambda d: d.find_element(By.XPATH, "//*[text()='Datasets']"), what="the Datasets section")
        [digest] = [i.dataset.digest for i in child.inputs.dataset_inputs if i.tags[0].value == "train"]
        page = wait_for(driver, lambda d: (text := d.find_element(By.TAG_NAME, "body").text) and
                        f"tldr ({digest})" in text and text, what=f"the tldr data set with its digest {digest}")
        assert "Train" in page and "dpo from tiny on tldr" in page  # its context; the description
        driver.save_screenshot(str(tmp_path / "mlflow_ui_run.png"))
    finally:
        driver.quit()
        server.stop()
    assert shot.stat().st_size > 10_000
    if os.environ.get("RLHF_EXP_UI_SCREENSHOT"):
        keep = Path(os.environ["RLHF_EXP_UI_SCREENSHOT"])
        shutil.copy(shot, keep)
        for page in ("report", "models", "run"):
            shutil.copy(tmp_path / f"mlflow_ui_{page}.png", keep.with_name(f"{keep.stem}_{page}.png"))
        (keep.with_suffix(".json")).write_text(json.dumps({"view": view}))


def test_a_finished_pipeline_opens_on_its_policies_figures_as_columns_and_its_table(tmp_path):
    """The quick pipeline, then its printed view: the parent's row on the UI's model-training side, each policy's
    win rate against the reference a column with the parent's value, and the eval table as an MLflow table."""
    from selenium.webdriver.common.by import By

    done = run_cli("experiment=quick_pipeline", "hardware=cpu", "hardware.num_threads=1", env=tracked_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    view = done.stdout.split("the policies side by side: ", 1)[1].split()[0]
    _, runs = mlflow_runs(tmp_path / "m.db")
    [parent] = [r for r in runs if r.data.tags.get("rlhf_exp.role") == "pipeline"]
    server = MlflowServer(f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "mlartifacts"),
                          log_path=tmp_path / "server.log")
    driver = browser()
    try:
        driver.get(server.uri + "/#" + view.split("/#", 1)[1])
        wait_for(driver, lambda d: d.find_element(By.XPATH, "//*[text()='Model registry']"), what="the training side")
        wait_for(driver, lambda d: d.find_element(By.XPATH, "//span[text()='pipeline quick']"), what="the parent run")
        wanted = {f"eval/{policy}/judge_win_vs_reference" for policy in ("sft", "dpo", "grpo")}
        wait_for(driver, lambda d: wanted <= {h.text for h in d.find_elements(By.CSS_SELECTOR, "[role=columnheader]")},
                 what=f"the columns {sorted(wanted)}")
        cells = row_cells(driver, "pipeline quick")
        for name in wanted:
            assert float(cells[f"metrics.`{name}`"]) == parent.data.metrics[name], (name, cells)
        driver.save_screenshot(str(tmp_path / "mlflow_ui_pipeline.png"))
        # the evaluation table, logged to the parent as an MLflow table
        driver.get(ui_address(server.uri, f"/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}/artifacts"))
        click(driver, "(//*[text()='eval'])[1]", "the eval folder")  # eval/<role>/: the eval stage's role is eval too
        click(driver, "(//*[text()='eval'])[2]", "the eval stage's folder")
        click(driver, "//*[text()='summary_table.json']", "the summary table")
        wait_for(driver, lambda d: "grpo" in d.find_element(By.TAG_NAME, "body").text and
                 "judge win vs reference" in d.find_element(By.TAG_NAME, "body").text, what="the table's rows")
        driver.save_screenshot(str(tmp_path / "mlflow_ui_pipeline_table.png"))
    finally:
        driver.quit()
        server.stop()
    if os.environ.get("RLHF_EXP_UI_SCREENSHOT"):
        keep = Path(os.environ["RLHF_EXP_UI_SCREENSHOT"])
        for page in ("pipeline", "pipeline_table"):
            shutil.copy(tmp_path / f"mlflow_ui_{page}.png", keep.with_name(f"{keep.stem}_{page}.png"))
