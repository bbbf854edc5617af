"""Runs ``tests/divergence_cases.py`` with oneDNN off and on: the guards must hold on both."""

import pytest
from conftest import run_cases_with_onednn


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_divergence_guards_hold_with_onednn_off_and_on(onednn):
    out = run_cases_with_onednn("divergence_cases.py", onednn)
    assert f"TF_ENABLE_ONEDNN_OPTS={onednn}: softmax" in out
