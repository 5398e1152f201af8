"""The example Bundle printed in docs/fhir.md is one a real FHIR R4 server accepts.

The generator builds it with the real ``report_bundle``; this test takes it from the committed
page (not from the generator), so what a reader copies is what was proven.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_io import FhirClient
from plugin.reference_docs import bundle_from_fhir_page, example_bundle

pytestmark = pytest.mark.integration

FHIR_PAGE = Path(__file__).resolve().parents[2] / "docs" / "fhir.md"


def test_the_example_bundle_in_the_fhir_page_is_accepted_by_a_real_server(
    fhir_base_url: str,
) -> None:
    bundle = bundle_from_fhir_page(FHIR_PAGE.read_text(encoding="utf-8"))
    assert bundle == example_bundle(), "docs/fhir.md is stale: run `make docs`"
    with FhirClient(fhir_base_url) as client:
        response = client.post_transaction(bundle)
        statuses = [entry["response"]["status"] for entry in response["entry"]]
        assert len(statuses) == len(bundle["entry"])
        assert all(status.split()[0] in ("200", "201") for status in statuses), statuses
        # Every created resource reads back as the type the page says it is.
        for sent, entry in zip(bundle["entry"], response["entry"], strict=True):
            location = entry["response"]["location"].split("/_history/")[0]
            resource_type = sent["resource"]["resourceType"]
            assert location.split("/")[-2] == resource_type
            assert client.read(location)["resourceType"] == resource_type
