import numpy as np
import pytest
import torch

from monai_bundle.scripts.metadata import (
    FIELD_SLOTS,
    METADATA_CHANNELS,
    METADATA_WIDTH,
    drop_fields,
    encode_metadata,
)


def test_full_and_empty_encodings() -> None:
    full = encode_metadata(45.0, "female", "torso")
    assert full.tolist() == pytest.approx([0.45, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    empty = encode_metadata(None, None, None)
    assert empty.tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert encode_metadata(float("nan"), None, None)[1] == 1
    assert METADATA_WIDTH == len(METADATA_CHANNELS) == 12


@pytest.mark.parametrize(
    ("age", "sex", "site", "message"),
    [(150.0, None, None, "age"), (None, "M", None, "sex"), (None, None, "back", "site")],
)
def test_values_outside_the_vocabulary_are_refused(age, sex, site, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        encode_metadata(age, sex, site)


def test_dropping_every_field_gives_the_empty_encoding() -> None:
    full = torch.from_numpy(np.stack([encode_metadata(70.0, "male", "head/neck")] * 4))
    dropped = drop_fields(full, p_field=0.0, p_all=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, torch.from_numpy(np.stack([encode_metadata(None, None, None)] * 4)))
    kept = drop_fields(full, p_field=0.0, p_all=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept, full)
    assert set(FIELD_SLOTS) == {"age", "sex", "site"}
