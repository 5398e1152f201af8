"""The [http] endpoint of a real `dermfusion serve` delivering to a real Orthanc and FHIR server:
/healthz, a /metrics scrape whose counters match what was sent, and the status page in a real
headless browser (Debian's chromium, driven by Selenium)."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import httpx
import pydicom
import pytest

from dicom_io.sr import ReportedFinding, read_reported_finding
from tests.integration.dermfusion_process import (
    DermfusionProcess,
    eventually,
    free_port,
    running_dermfusion,
)
from tests.integration.orthanc_server import OrthancServer
from tests.integration.studies import dermoscopy_study, storescu

pytestmark = pytest.mark.integration
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# Marked identifiers: none of them may appear on the page or in the metrics.
PATIENT_NAME = "Pagecheck^Zelda"
PATIENT_ID = "PAGE-ID-5150"


def _study(tmp_path: Path, images: int) -> tuple[str, list[Path]]:
    return dermoscopy_study(
        tmp_path, patient_id=PATIENT_ID, patient_name=PATIENT_NAME, images=images, age="061Y"
    )


def _srs(orthanc: OrthancServer, study_uid: str) -> list[ReportedFinding]:
    found = []
    for instance in orthanc.study_instances(study_uid):
        if orthanc.instance_metadata(instance["ID"]).get("SopClassUid") == COMPREHENSIVE_3D_SR:
            raw = httpx.get(f"{orthanc.http}/instances/{instance['ID']}/file").content
            found.append(read_reported_finding(pydicom.dcmread(io.BytesIO(raw))))
    return found


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text; absent → AssertionError naming it."""
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    wanted = f"{name}{{{label_text}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == wanted or (not labels and sample == name):
            return float(value)
    raise AssertionError(f"{wanted} not in /metrics:\n{text}")


def _chromium() -> tuple[str, str]:
    """Debian's chromium and its driver; `make test` installs them, so absence is an error."""
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    assert browser and driver, "chromium and chromium-driver are missing: run `make system-deps`"
    return browser, driver


def test_metrics_health_and_status_page_after_real_studies(
    orthanc: OrthancServer, fhir_base_url: str, tmp_path: Path
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    http_port = free_port()
    with running_dermfusion(
        tmp_path / "service",
        pacs_port=orthanc.dicom_port,
        fhir_url=fhir_base_url,
        http_port=http_port,
    ) as service:
        base = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok", "problems": []}
        first_uid, first = _study(tmp_path, images=2)
        second_uid, second = _study(tmp_path, images=1)
        for files in (first, second):
            run = storescu(service.ae_title, service.port, files)
            assert run.returncode == 0, run.stderr
        refused = storescu("NOT-OURS", service.port, second)
        assert refused.returncode != 0  # association rejected: called AE is not ours
        srs = {
            uid: eventually(
                lambda uid=uid, n=n: (s := _srs(orthanc, uid)) and len(s) == n and s,
                120,
                f"{n} SR(s) of study {uid} in Orthanc",
            )
            for uid, n in ((first_uid, 2), (second_uid, 1))
        }
        text = eventually(
            lambda: (
                (t := httpx.get(f"{base}/metrics").text)
                and "dermfusion_outbox_owed{" not in t  # nothing owed any more
                and t
            ),
            60,
            "every report delivered (no dermfusion_outbox_owed sample)",
        )
        _assert_metrics(text)
        _assert_page_in_browser(service, base, srs, _chromium(), webdriver, Service, By)


def _assert_metrics(text: str) -> None:
    assert _metric(text, "dermfusion_instances_received_total") == 3
    assert _metric(text, "dermfusion_studies_scored_total") == 2
    assert _metric(text, "dermfusion_images_scored_total") == 3
    assert _metric(text, "dermfusion_instances_failed_total") == 0
    assert _metric(text, "dermfusion_refusals_total", kind="association", status="called-ae") == 1
    assert _metric(text, "dermfusion_scoring_seconds_count") == 2
    assert _metric(text, "dermfusion_healthy") == 1
    assert _metric(text, "dermfusion_studies_waiting") == 0
    assert _metric(text, "dermfusion_parked", kind="study") == 0
    assert _metric(text, "dermfusion_parked", kind="outbox") == 0
    assert PATIENT_ID not in text and "Pagecheck" not in text


def _assert_page_in_browser(  # type: ignore[no-untyped-def]
    service: DermfusionProcess,
    base: str,
    srs: dict[str, list[ReportedFinding]],
    chromium: tuple[str, str],
    webdriver,
    Service,  # noqa: N803 - selenium's class, passed in so the import stays in the test
    By,  # noqa: N803
) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromium[1]), options=options)
    try:
        driver.get(f"{base}/")
        assert driver.title == "dermfusion status"
        assert driver.find_element(By.ID, "health").text == "Healthy"
        rows = driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr[data-sr]")
        shown = {}
        for row in rows:
            study = row.find_element(By.CSS_SELECTOR, "td.study").text
            image = row.find_element(By.CSS_SELECTOR, "td.image").text
            probability = float(row.find_element(By.CSS_SELECTOR, "td.probability").text)
            decision = row.find_element(By.CSS_SELECTOR, "td.decision").text
            deliveries = {
                cell.get_attribute("data-destination"): cell.text
                for cell in row.find_elements(By.CSS_SELECTOR, "td.delivery")
            }
            picture = row.find_element(By.CSS_SELECTOR, "img.saliency")
            loaded = driver.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", picture
            )
            assert loaded and loaded > 0, f"saliency image of {image} did not load"
            shown[image] = (study, probability, decision, deliveries)
        expected = {
            sr.source_sop_instance_uid: (study, sr) for study, found in srs.items() for sr in found
        }
        assert set(shown) == set(expected)  # every scored image, none invented
        for image, (study, probability, decision, deliveries) in shown.items():
            want_study, sr = expected[image]
            assert study == want_study
            assert probability == pytest.approx(sr.probability, abs=5e-4)
            assert decision.startswith(
                "melanoma suspected" if sr.melanoma_suspected else "not suspected"
            )
            assert set(deliveries) == {"pacs", "fhir", "explanation"}  # + the overlay, drawn
            assert all(re.match(r"delivered \d{4}-", text) for text in deliveries.values())
        # The newest study first.
        assert rows[0].find_element(By.CSS_SELECTOR, "td.study").text == list(srs)[-1]
        source = driver.page_source
        assert PATIENT_ID not in source and "Pagecheck" not in source and "Zelda" not in source
    finally:
        driver.quit()
    assert httpx.get(f"{base}/saliency/..%2f..%2fetc%2fpasswd.png").status_code == 404
    assert httpx.get(f"{base}/nothing-here").status_code == 404
    assert "Traceback" not in service.log_text()
