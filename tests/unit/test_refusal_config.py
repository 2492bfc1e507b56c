"""The shipped model configs use the documented, sourced keyword lists of refusal_lab.refusal."""

from pathlib import Path

import pytest
import yaml

from refusal_lab.refusal import REFUSAL_PREFIXES

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


@pytest.mark.parametrize(("option", "key"), [("llama2_7b", "llama2"), ("mistral_7b", "mistral")])
def test_model_config_prefixes_are_the_documented_list(option, key):
    conf = yaml.safe_load((CONF / f"{option}.yaml").read_text())
    assert conf["refusal_prefixes"] == REFUSAL_PREFIXES[key]
