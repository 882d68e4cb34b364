"""One rule for task names, wherever a name enters (ingest, submit, DeltaNetwork.add_task)."""

from __future__ import annotations

import pytest

from deltapatch.errors import DatasetError, TaskNameError
from deltapatch.task_names import validate_task_name


@pytest.mark.parametrize("name", ["a", "shapes", "street-signs", "v2", "a" * 64, "1-2-3"])
def test_valid_names_pass(name: str) -> None:
    assert validate_task_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("base", "reserved"), ("foo-", "invalid task name"), ("-foo", "invalid task name"), ("", "invalid task name"),
    ("Bad_Name", "--task bad-name"), ("a" * 65, "invalid task name"), ("ünï", "invalid task name"),
    ("shapes\n", "invalid task name"), ("a\n", "invalid task name"), ("\nshapes", "invalid task name"),
])
def test_invalid_names_raise_one_error_type(name: str, why: str) -> None:
    with pytest.raises(TaskNameError, match=why) as error:
        validate_task_name(name)
    assert isinstance(error.value, DatasetError)  # ingest quarantines a dataset with a bad name


def test_trailing_newline_is_refused_by_the_shared_pattern_too() -> None:
    """`$` matches before a trailing newline: "shapes\\n" passed `TASK_NAME_RE.match` (issue item 8)."""
    from deltapatch.task_names import TASK_NAME_RE

    assert TASK_NAME_RE.match("shapes") and TASK_NAME_RE.fullmatch("shapes")
    assert TASK_NAME_RE.match("shapes\n") is None and TASK_NAME_RE.fullmatch("shapes\n") is None


def test_network_ingest_and_submit_use_the_same_rule() -> None:
    from deltapatch import inbox
    from deltapatch.data import ingest
    from deltapatch.delta import BASE, DeltaNetwork, make_config
    from deltapatch.delta import network as delta_network
    from tests.delta.conftest import random_base

    assert ingest.validate_task_name is validate_task_name
    assert delta_network.validate_task_name is validate_task_name
    assert inbox.validate_task_name is validate_task_name
    assert BASE == "base"
    net = DeltaNetwork(random_base())
    with pytest.raises(TaskNameError, match="invalid task name 'foo-'"):  # the network accepted it before
        net.add_task("foo-", 2, make_config("channel"))
    assert net.tasks == []
