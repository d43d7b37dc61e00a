"""The UI workflow in a real Chromium against servers started by `infra.local.up`: start a data
refresh from the Prefect UI with a changed parameter (Custom run), watch it complete, see its
artifacts; then find the same run's metrics and datasets in the MLflow UI. Screenshots of every
step go to test-output/browser/."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra import local

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-output" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SNAPSHOT = "CC-MAIN-2026-40"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="browser test needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
    ),
]


@pytest.fixture(scope="module")
def page() -> Iterator:
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        # Debian's chromium, never a browser Playwright would download.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)  # the UIs are heavy single-page apps
        yield page
        browser.close()


def form_property(page, label: str):
    """The schema-form field whose own label (not a nested one) is `label`."""
    return page.locator(
        "xpath=//div[contains(concat(' ', @class, ' '), ' schema-form-property ')]"
        "[./div[contains(@class, 'p-label__header')]"
        f"//span[contains(@class, 'schema-form-property__label')][normalize-space()='{label}']]"
    )


def test_custom_run_from_prefect_ui_then_mlflow_ui(platform: local.Platform, page, tmp_path: Path) -> None:
    custom_run_then_mlflow(platform, page, tmp_path / "workdir")


def custom_run_then_mlflow(platform: local.Platform, page, workdir: Path) -> None:
    # Deployments list -> data-refresh -> Run -> Custom run.
    page.goto(f"{platform.prefect_ui_url}/deployments", wait_until="domcontentloaded")
    # The flow is called data-refresh too: take the link to the deployment.
    page.locator("a[href*='/deployments/deployment/']", has_text="data-refresh").first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/"))
    page.get_by_role("button", name="Run", exact=True).wait_for()  # the list also shows the schedule
    page.get_by_text("At 02:00 AM every day").first.wait_for()
    page.screenshot(path=SHOTS / "01-deployment.png")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.get_by_text("Parameters", exact=True).wait_for()
    run_name = f"ui-custom-run-{secrets.token_hex(3)}"
    page.locator(
        "xpath=//div[contains(@class, 'p-label')][./div/label[normalize-space()='Run Name']]//input"
    ).fill(run_name)

    # The run form: the parameter model as fields. Change it to a one-file slice of one snapshot, its
    # first 100 records (a nested model's field: all 462 cost the flow run 20 s).
    form_property(page, "Workdir (Optional)").locator("textarea").fill(str(workdir))
    snapshots = form_property(page, "Snapshots (Optional)")
    snapshots.get_by_role("button", name="Add item").click()
    snapshots.locator("textarea, input").first.fill(SNAPSHOT)
    kinds = form_property(page, "Kinds (Optional)")
    kinds.locator(".p-tag", has_text=re.compile(r"^warc$")).locator(".p-tag__dismiss").click()
    max_files = form_property(page, "Max Files (Optional)")
    max_files.get_by_role("button", name="int", exact=True).click()
    max_files.locator("input").first.fill("1")
    max_records = form_property(page, "Max Records Per File (Optional)")
    max_records.get_by_role("button", name="int", exact=True).click()
    max_records.locator("input").first.fill("100")
    build = form_property(page, "Build Training Data (Optional)")
    build.get_by_role("switch").click()
    form_text = page.locator("body").inner_text()
    page.set_viewport_size({"width": 1400, "height": 9000})  # the form scrolls inside the page
    page.screenshot(path=SHOTS / "02-run-form.png")
    page.set_viewport_size({"width": 1400, "height": 1000})
    assert "[object Object]" not in form_text, "a parameter renders as [object Object]; see 02-run-form.png"
    assert "Crawl (Optional)" in form_text and "Dedup (Optional)" in form_text

    page.get_by_role("button", name="Submit").click()
    # The confirmation toast slides in and out; find the run the form created by its name instead.
    deadline = time.monotonic() + 60
    created: list = []
    while not created and time.monotonic() < deadline:
        created = httpx.post(
            f"{platform.prefect_api_url}/flow_runs/filter",
            json={"flow_runs": {"name": {"any_": [run_name]}}},
            timeout=60,
        ).json()
        time.sleep(0 if created else 0.5)
    assert len(created) == 1, f"the form created {len(created)} runs named {run_name}"
    flow_run_id = created[0]["id"]
    page.goto(f"{platform.prefect_ui_url}/runs/flow-run/{flow_run_id}", wait_until="domcontentloaded")
    run = httpx.get(f"{platform.prefect_api_url}/flow_runs/{flow_run_id}", timeout=60).json()
    assert run["name"] == run_name
    assert run["parameters"]["params"]["max_files"] == 1
    assert run["parameters"]["params"]["ingest"]["max_records_per_file"] == 100
    assert run["parameters"]["params"]["kinds"] == ["wet"]
    assert run["parameters"]["params"]["snapshots"] == [SNAPSHOT]

    # The worker started by `up` picks the run up. Task runs show "Completed" badges early, so wait
    # on the flow run's own state, then see the page say so.
    deadline = time.monotonic() + 240
    while (
        run["state_type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        and time.monotonic() < deadline
    ):
        time.sleep(1)
        run = httpx.get(f"{platform.prefect_api_url}/flow_runs/{flow_run_id}", timeout=60).json()
    page.reload(wait_until="domcontentloaded")
    page.get_by_text(run_name).first.wait_for()
    page.screenshot(path=SHOTS / "03-run-finished.png")
    assert run["state_type"] == "COMPLETED", f"flow run ended {run['state_name']}; see 03-run-finished.png"
    page.get_by_text("Completed", exact=True).first.wait_for()
    assert (workdir / "dedup-index").exists()
    page.get_by_role("tab", name="Artifacts").or_(page.get_by_text("Artifacts", exact=True)).first.click()
    page.get_by_text("data-refresh-stage-counts").first.wait_for()
    page.screenshot(path=SHOTS / "04-artifacts.png", full_page=True)

    # MLflow: the experiment's runs list shows the run (named after the flow run) and its dataset.
    experiments = httpx.get(
        f"{platform.mlflow_url}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": "data-refresh"},
        timeout=30,
    ).json()
    page.goto(
        f"{platform.mlflow_url}/#/experiments/{experiments['experiment']['experiment_id']}/runs",
        wait_until="domcontentloaded",
    )
    page.get_by_role("link", name=run_name).wait_for()
    page.get_by_text(f"crawl/{SNAPSHOT}").first.wait_for()
    page.screenshot(path=SHOTS / "05-mlflow-runs.png")
    page.get_by_role("link", name=run_name).click()
    page.get_by_text(f"{SNAPSHOT}.dedup.kept").wait_for()
    page.get_by_text(f"crawl/{SNAPSHOT}").first.wait_for()
    page.screenshot(path=SHOTS / "06-mlflow-run.png", full_page=True)


# ---------------------------------------------------------------------------------------------
# The training run's page: what it was trained on, its checkpoints as models, its eval charts


@pytest.fixture(scope="module")
def trained_on_platform(platform: local.Platform, corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny pretrain flow run (2 CPU ranks, 20 steps, checkpoints at 10 and 20) against the
    platform's Prefect and MLflow servers, on data packed and published as the data refresh does."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pretrain import PretrainParams, pretrain
    from tasks import dataset as ds
    from tasks import pack
    from tasks import tokenizer as tk
    from tests.test_tokenizer import SMALL, build_lid_dataset

    root = tmp_path_factory.mktemp("browser-train")
    documents = build_lid_dataset(corpus, root / "documents", limit=300, shards=1)
    tk.train_tokenizer([documents], root / "tokenizer", SMALL.model_copy(update={"sample_chars": 300_000}))
    config = pack.PackConfig(seq_len=32, tokens_per_shard=33 * 200, validation_fraction=0.1)
    pack.pack_datasets([documents], root / "tokenizer", root / "packed-build", config)
    ds.publish_version(root / "packed-build", root / "packed")
    params = PretrainParams(
        run_name=f"browser-{secrets.token_hex(3)}",
        data_dir=str(root / "packed"),
        runs_root=str(root / "runs"),
        train={"max_steps": 20, "micro_batch_size": 4, "log_interval": 2, "checkpoint_interval": 10},
        eval={"max_tokens": 2000, "min_windows_per_slice": 1, "threads": 1},
        checkpoint_poll_s=0.2,
        launcher={"kind": "local", "device": "cpu", "nproc_per_node": 2},
        retries=0,
        mlflow_tracking_uri=platform.mlflow_url,
    )
    with temporary_settings({PREFECT_API_URL: platform.prefect_api_url}):
        return params, pretrain(params)


def test_the_training_run_page_shows_data_models_versions_and_eval_charts(trained_on_platform, page) -> None:
    from mlflow.tracking import MlflowClient

    from tasks import dataset as ds
    from tasks import run_tracking as rt

    params, result = trained_on_platform
    data = rt.TrainingData.of(result.data_dir)
    final = MlflowClient(tracking_uri=params.mlflow_tracking_uri).get_model_version_by_alias(
        params.run_name, "final"
    )
    assert result.mlflow_url.startswith(params.mlflow_tracking_uri)
    page.goto(result.mlflow_url, wait_until="domcontentloaded")
    # Overview: the dataset inputs with their digests (the tokenizer behind "+1"), the checkpoints'
    # logged models, the registered model's version.
    packed = page.get_by_text(f"packed ({data.packed_digest})").first
    packed.wait_for()
    packed.locator("xpath=ancestor::*[.//*[normalize-space()='+1']][1]").get_by_text(
        "+1", exact=True
    ).first.click()
    page.get_by_text(f"tokenizer ({ds.mlflow_digest(data.tokenizer_dir)})").first.wait_for()
    page.get_by_text("step-20", exact=True).first.wait_for()
    page.get_by_role("link", name=params.run_name, exact=True).first.wait_for()
    page.get_by_text(f"v{final.version}", exact=True).first.wait_for()
    page.screenshot(path=SHOTS / "07-training-run.png", full_page=True)
    # The eval charts, one point per evaluated checkpoint.
    page.get_by_role("tab", name="Model metrics").first.click()
    page.get_by_placeholder("Search metric charts").fill("val/bpb")  # charts off screen are not drawn
    page.get_by_text(f"{params.run_name} (val/bpb)").first.wait_for()
    page.screenshot(path=SHOTS / "08-training-run-charts.png", full_page=True)
