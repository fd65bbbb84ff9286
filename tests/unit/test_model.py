import uuid

import pytest

from streamsvc.model import derived_id


@pytest.mark.parametrize("name", ["streamsvc:inbox:1700000000000-0", "x", "ü:42", ""])
def test_derived_ids_are_the_uuid5_of_their_name(name: str) -> None:
    namespace = uuid.uuid4()
    assert derived_id(namespace, name) == str(uuid.uuid5(namespace, name))
