from __future__ import annotations

import datetime as dt
import inspect

import pytest

from scepd import config as config_mod, errors
from scepd.errors import ERROR_TABLE, FailInfo, mapping_for


def _all_error_classes():
    return [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
            if issubclass(obj, errors.ScepdError)]


def test_error_table_is_complete():
    missing = [c.__name__ for c in _all_error_classes() if c not in ERROR_TABLE]
    assert missing == []


@pytest.mark.parametrize("cls,fail_info,status", [
    (errors.ForbiddenAlgorithm, FailInfo.BAD_ALG, 400),
    (errors.BadMessageCheck, FailInfo.BAD_MESSAGE_CHECK, 400),
    (errors.ChallengeRejected, FailInfo.BAD_REQUEST, 403),
    (errors.BadTime, FailInfo.BAD_TIME, 400),
    (errors.BadCertId, FailInfo.BAD_CERT_ID, 404),
    (errors.PayloadTooLarge, FailInfo.BAD_REQUEST, 413),
])
def test_mapping(cls, fail_info, status):
    m = mapping_for(cls("x"))
    assert m.fail_info == fail_info and m.http_status == status
    assert m.acme_type.startswith("urn:ietf:params:acme:error:")


def test_env_overrides_file(tmp_path):
    (tmp_path / "scepd.toml").write_text(config_mod.render_default())
    cfg = config_mod.load(tmp_path, environ={"SCEPD_SCEP_STATIC_CHALLENGE": "s3cret",
                                             "SCEPD_SCEP_LEGACY_ALGORITHMS": "1",
                                             "SCEPD_SERVER_HTTP": "127.0.0.1:9999"})
    assert cfg.scep.static_challenge == "s3cret"
    assert cfg.scep.legacy_algorithms is True
    assert cfg.base_url == "http://127.0.0.1:9999"
    defaults = config_mod.load(tmp_path, environ={})
    assert defaults.scep.legacy_algorithms is False and defaults.scep.static_challenge == ""


def test_unknown_key_and_bad_values_are_errors(tmp_path):
    (tmp_path / "scepd.toml").write_text("[scep]\nlegacy_algoritms = true\n")
    with pytest.raises(config_mod.ConfigError, match="unknown key"):
        config_mod.load(tmp_path, environ={})
    (tmp_path / "scepd.toml").write_text("")
    with pytest.raises(config_mod.ConfigError):
        config_mod.load(tmp_path, environ={"SCEPD_SCEP_LEGACY_ALGORITHMS": "maybe"})


@pytest.mark.parametrize("text,delta", [("90d", dt.timedelta(days=90)), ("1h", dt.timedelta(hours=1)),
                                        ("30m", dt.timedelta(minutes=30)), ("45", dt.timedelta(seconds=45))])
def test_parse_duration(text, delta):
    assert config_mod.parse_duration(text) == delta


def test_parse_duration_rejects_junk():
    with pytest.raises(config_mod.ConfigError):
        config_mod.parse_duration("soon")
