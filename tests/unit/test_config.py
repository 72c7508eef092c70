"""Configuration: TOML file + EDGE_* overrides -> frozen Config, every problem names its field."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main
from edge_agent.config import (
    AllowedCaller,
    Config,
    DicomConfig,
    LoggingConfig,
    StorageConfig,
    StudiesConfig,
    TlsConfig,
    load_config,
)
from edge_agent.errors import ConfigError

# The smallest valid file: everything else takes its default.
MINIMAL = """
[dicom]
allowed_callers = ["STORESCU"]
"""

FULL = """
[dicom]
ae_title = "EDGE_CT"
bind_address = "10.1.2.3"
port = 104
max_associations = 32
require_called_ae_title = false
allow_any_caller = false
acse_timeout_s = 10
dimse_timeout_s = 120.5
network_timeout_s = 90.0
max_pdu_bytes = 0
shutdown_grace_s = 5.0
allowed_callers = [
  { ae_title = "PACS", host = "10.0.0.0/8" },
  { ae_title = "CT_SCANNER", host = "192.168.1.20" },
  { ae_title = "ANYWHERE" },
  "MR1@172.16.0.0/12",
  "US1",
]

[dicom.tls]
enabled = false
cert_file = ""
key_file = ""
ca_file = ""

[storage]
data_dir = "/srv/edge/data"
database = "system.db"
hot_dir = "/mnt/nvme/hot"
warm_dir = "warm"
cold_dir = "/mnt/hdd/cold"
quarantine_dir = "q"
min_free_mb = 2048
fsync = true

[studies]
quiet_period_s = 15
check_interval_s = 0.25

[studies.quiet_period_by_modality]
CT = 20.0
mr = 30

[logging]
level = "DEBUG"
json = false
"""


def write(tmp_path: Path, text: str, name: str = "edge-agent.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env=env or {})


def config_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    return info.value


# ---------------------------------------------------------------------------------------------
# Loading


def test_minimal_file_takes_every_default(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL)
    assert cfg.dicom == DicomConfig(allowed_callers=(AllowedCaller(ae_title="STORESCU"),))
    assert cfg.dicom.tls == TlsConfig()
    assert cfg.dicom.port == 11112
    assert cfg.dicom.ae_title == "EDGE_AGENT"
    assert cfg.studies == StudiesConfig()
    assert cfg.logging == LoggingConfig()
    # The default data_dir is absolute, so the storage section is the default, unchanged.
    assert cfg.storage == StorageConfig()
    assert cfg.storage.min_free_mb == 1024
    assert cfg.storage.fsync is True


def test_defaults_alone_are_rejected_because_nobody_may_call(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={})
    assert info.value.field == "dicom.allowed_callers"


def test_defaults_with_allow_any_caller_from_env() -> None:
    cfg = load_config(None, env={"EDGE_DICOM_ALLOW_ANY_CALLER": "true"})
    assert cfg.dicom.allow_any_caller is True
    assert cfg.dicom.allowed_callers == ()


def test_full_realistic_file(tmp_path: Path) -> None:
    cfg = load(tmp_path, FULL)
    d = cfg.dicom
    assert (d.ae_title, d.bind_address, d.port, d.max_associations) == (
        "EDGE_CT",
        "10.1.2.3",
        104,
        32,
    )
    assert d.require_called_ae_title is False
    assert d.acse_timeout_s == 10.0
    assert isinstance(d.acse_timeout_s, float)  # TOML integer converted for a float field
    assert d.dimse_timeout_s == 120.5
    assert d.max_pdu_bytes == 0
    assert d.allowed_callers == (
        AllowedCaller(ae_title="PACS", host="10.0.0.0/8"),
        AllowedCaller(ae_title="CT_SCANNER", host="192.168.1.20"),
        AllowedCaller(ae_title="ANYWHERE", host=""),
        AllowedCaller(ae_title="MR1", host="172.16.0.0/12"),
        AllowedCaller(ae_title="US1", host=""),
    )
    s = cfg.storage
    assert s.data_dir == "/srv/edge/data"
    assert s.path("database") == Path("/srv/edge/data/system.db")
    assert s.path("hot_dir") == Path("/mnt/nvme/hot")
    assert s.path("warm_dir") == Path("/srv/edge/data/warm")
    assert s.path("quarantine_dir") == Path("/srv/edge/data/q")
    assert s.min_free_mb == 2048
    st = cfg.studies
    assert st.quiet_period_s == 15.0
    assert st.check_interval_s == 0.25
    assert dict(st.quiet_period_by_modality) == {"CT": 20.0, "MR": 30.0}  # keys upper-cased
    assert st.quiet_period_for("ct") == 20.0
    assert st.quiet_period_for("MR") == 30.0
    assert st.quiet_period_for("US") == 15.0
    assert cfg.logging == LoggingConfig(level="DEBUG", json=False)


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL)
    with pytest.raises(AttributeError):
        cfg.dicom.port = 1  # type: ignore[misc]


def test_relative_data_dir_resolves_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    path = write(tmp_path / "etc" / "edge", MINIMAL + '\n[storage]\ndata_dir = "../data"\n')
    cfg = load_config(path, env={})
    expected = (tmp_path / "etc" / "edge").resolve() / "../data"
    assert Path(cfg.storage.data_dir) == expected
    assert Path(cfg.storage.data_dir).is_absolute()
    assert cfg.storage.path("hot_dir").resolve() == (tmp_path / "etc" / "data" / "hot").resolve()


def test_relative_data_dir_from_env_also_resolves_against_the_config_folder(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "cfg", MINIMAL)
    cfg = load_config(path, env={"EDGE_STORAGE_DATA_DIR": "spool"})
    assert Path(cfg.storage.data_dir) == (tmp_path / "cfg").resolve() / "spool"


# ---------------------------------------------------------------------------------------------
# Allowed callers


def test_allowed_callers_as_tables_and_strings(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
[dicom]
allowed_callers = [
  { ae_title = "PACS", host = "10.0.0.0/8" },
  { ae_title = "WS" },
  "CT1@192.168.0.7",
  " MR1 @ 2001:db8::/32 ",
  "ECHO",
]
""",
    )
    assert cfg.dicom.allowed_callers == (
        AllowedCaller(ae_title="PACS", host="10.0.0.0/8"),
        AllowedCaller(ae_title="WS", host=""),
        AllowedCaller(ae_title="CT1", host="192.168.0.7"),
        AllowedCaller(ae_title="MR1", host="2001:db8::/32"),
        AllowedCaller(ae_title="ECHO", host=""),
    )


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ('{ ae_title = "PACS", hots = "10.0.0.1" }', "dicom.allowed_callers[1].hots"),
        ('{ ae_title = "PACS", host = "10.0.0.300" }', "dicom.allowed_callers[1].host"),
        ('"PACS@not-a-network"', "dicom.allowed_callers[1].host"),
        ('{ ae_title = "WAY_TOO_LONG_AE_TITLE" }', "dicom.allowed_callers[1].ae_title"),
        ('"@10.0.0.1"', "dicom.allowed_callers[1].ae_title"),
        ("42", "dicom.allowed_callers[1]"),
        ("{ ae_title = 7 }", "dicom.allowed_callers[1].ae_title"),
    ],
)
def test_bad_allowed_caller_names_its_index(tmp_path: Path, entry: str, field: str) -> None:
    err = config_error(tmp_path, f'[dicom]\nallowed_callers = ["OK", {entry}]\n')
    assert err.field == field


def test_allowed_callers_must_be_a_list(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[dicom]\nallowed_callers = "PACS"\n')
    assert err.field == "dicom.allowed_callers"


@pytest.mark.parametrize(
    ("caller", "ae", "ip", "expected"),
    [
        (AllowedCaller(ae_title="PACS"), "PACS", "203.0.113.9", True),
        (AllowedCaller(ae_title="PACS"), "PACS    ", "203.0.113.9", True),  # DICOM padding
        (AllowedCaller(ae_title="PACS"), "pacs", "203.0.113.9", False),  # case matters
        (AllowedCaller(ae_title="PACS"), "PACS2", "203.0.113.9", False),
        (AllowedCaller(ae_title="PACS", host="10.1.2.3"), "PACS", "10.1.2.3", True),
        (AllowedCaller(ae_title="PACS", host="10.1.2.3"), "PACS", "10.1.2.4", False),
        (AllowedCaller(ae_title="PACS", host="10.0.0.0/8"), "PACS", "10.255.0.1", True),
        (AllowedCaller(ae_title="PACS", host="10.0.0.0/8"), "PACS", "11.0.0.1", False),
        (AllowedCaller(ae_title="PACS", host="10.0.0.0/8"), "OTHER", "10.0.0.1", False),
        (AllowedCaller(ae_title="PACS", host="10.1.2.3/24"), "PACS", "10.1.2.200", True),
        (AllowedCaller(ae_title="PACS", host="2001:db8::/32"), "PACS", "2001:db8::1", True),
        (AllowedCaller(ae_title="PACS", host="2001:db8::/32"), "PACS", "2001:db9::1", False),
        (AllowedCaller(ae_title="PACS", host="10.0.0.0/8"), "PACS", "2001:db8::1", False),
        (AllowedCaller(ae_title="PACS", host="10.0.0.0/8"), "PACS", "not-an-ip", False),
        (AllowedCaller(ae_title="PACS", host="10.0.0.0/8"), "PACS", "", False),
    ],
)
def test_allowed_caller_matches(caller: AllowedCaller, ae: str, ip: str, expected: bool) -> None:
    assert caller.matches(ae, ip) is expected


# ---------------------------------------------------------------------------------------------
# Environment overrides


def test_env_overrides_int_bool_float_callers_and_modality_map(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        FULL,
        env={
            "EDGE_DICOM_PORT": " 11113 ",
            "EDGE_DICOM_REQUIRE_CALLED_AE_TITLE": "yes",
            "EDGE_LOGGING_JSON": "On",
            "EDGE_DICOM_DIMSE_TIMEOUT_S": "7.5",
            "EDGE_DICOM_ALLOWED_CALLERS": "PACS@10.0.0.0/8, CT1,",
            "EDGE_STUDIES_QUIET_PERIOD_BY_MODALITY": "CT=20, mr = 30",
            "EDGE_STORAGE_MIN_FREE_MB": "0",
            "EDGE_CONFIG": "/ignored/by/load_config.toml",
            "PATH": "/usr/bin",  # not ours: ignored
        },
    )
    assert cfg.dicom.port == 11113
    assert cfg.dicom.require_called_ae_title is True  # file said false
    assert cfg.logging.json is True  # file said false
    assert cfg.dicom.dimse_timeout_s == 7.5
    # The env list replaces the file's list entirely.
    assert cfg.dicom.allowed_callers == (
        AllowedCaller(ae_title="PACS", host="10.0.0.0/8"),
        AllowedCaller(ae_title="CT1", host=""),
    )
    assert dict(cfg.studies.quiet_period_by_modality) == {"CT": 20.0, "MR": 30.0}
    assert cfg.storage.min_free_mb == 0
    # Untouched fields keep the file's values.
    assert cfg.dicom.ae_title == "EDGE_CT"
    assert cfg.studies.quiet_period_s == 15.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("TRUE", True), ("on", True), ("0", False), ("false", False), ("No", False)],
)
def test_env_bool_spellings(tmp_path: Path, value: str, expected: bool) -> None:
    cfg = load(tmp_path, MINIMAL, env={"EDGE_STORAGE_FSYNC": value})
    assert cfg.storage.fsync is expected


def test_env_nested_tls_section(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "cert.pem")
    key = write(tmp_path, "key", "key.pem")
    cfg = load(
        tmp_path,
        MINIMAL,
        env={
            "EDGE_DICOM_TLS_ENABLED": "true",
            "EDGE_DICOM_TLS_CERT_FILE": str(cert),
            "EDGE_DICOM_TLS_KEY_FILE": str(key),
        },
    )
    assert cfg.dicom.tls == TlsConfig(enabled=True, cert_file=str(cert), key_file=str(key))


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"EDGE_DICOM_PROT": "104"}, "EDGE_DICOM_PROT"),
        ({"EDGE_STORAGE_HOTDIR": "/x"}, "EDGE_STORAGE_HOTDIR"),
        ({"EDGE_DICOM_TLS": "true"}, "EDGE_DICOM_TLS"),  # a section, not a setting
        ({"EDGE_DICOM_PORT": "eleven"}, "dicom.port"),
        ({"EDGE_DICOM_PORT": "0"}, "dicom.port"),
        ({"EDGE_DICOM_ALLOW_ANY_CALLER": "maybe"}, "dicom.allow_any_caller"),
        ({"EDGE_STUDIES_QUIET_PERIOD_S": "soon"}, "studies.quiet_period_s"),
        ({"EDGE_STUDIES_QUIET_PERIOD_BY_MODALITY": "CT:20"}, "studies.quiet_period_by_modality"),
        (
            {"EDGE_STUDIES_QUIET_PERIOD_BY_MODALITY": "CT=twenty"},
            "studies.quiet_period_by_modality.CT",
        ),
        ({"EDGE_DICOM_ALLOWED_CALLERS": "PACS@10.0.0.0/33"}, "dicom.allowed_callers[0].host"),
        ({"EDGE_DICOM_ALLOWED_CALLERS": " , "}, "dicom.allowed_callers"),  # empty list
    ],
)
def test_bad_env_override_names_the_field(tmp_path: Path, env: dict[str, str], field: str) -> None:
    err = config_error(tmp_path, MINIMAL, env)
    assert err.field == field
    assert field in str(err)


def test_env_override_conflicting_with_the_file_shape(tmp_path: Path) -> None:
    # The file makes dicom.tls a string; EDGE_DICOM_TLS_ENABLED cannot go inside it.
    err = config_error(
        tmp_path,
        '[dicom]\nallowed_callers = ["A"]\ntls = "off"\n',
        {"EDGE_DICOM_TLS_ENABLED": "true"},
    )
    assert err.field == "dicom.tls.enabled"


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("EDGE_DICOM_PORT", "2762")
    assert load_config(write(tmp_path, MINIMAL)).dicom.port == 2762
    monkeypatch.setenv("EDGE_DICOM_PORTT", "2762")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL))
    assert info.value.field == "EDGE_DICOM_PORTT"


# ---------------------------------------------------------------------------------------------
# Errors name the exact field


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[dicom]\nprot = 104\nallowed_callers = ["A"]\n', "dicom.prot"),
        ('[dicom]\nallowed_callers = ["A"]\n[dicom.tls]\nenable = true\n', "dicom.tls.enable"),
        ('[dicom]\nallowed_callers = ["A"]\n[storge]\nmin_free_mb = 1\n', "storge"),
        ('port = 104\n[dicom]\nallowed_callers = ["A"]\n', "port"),
        ("dicom = 5\n", "dicom"),
        ('[dicom]\nallowed_callers = ["A"]\nport = 0\n', "dicom.port"),
        ('[dicom]\nallowed_callers = ["A"]\nport = 70000\n', "dicom.port"),
        ('[dicom]\nallowed_callers = ["A"]\nport = -1\n', "dicom.port"),
        ('[dicom]\nallowed_callers = ["A"]\nport = "11112"\n', "dicom.port"),
        ('[dicom]\nallowed_callers = ["A"]\nport = 104.0\n', "dicom.port"),
        ('[dicom]\nallowed_callers = ["A"]\nport = true\n', "dicom.port"),
        ('[dicom]\nallowed_callers = ["A"]\nae_title = "SEVENTEEN_CHARS__"\n', "dicom.ae_title"),
        ('[dicom]\nallowed_callers = ["A"]\nae_title = "EDGE\\\\1"\n', "dicom.ae_title"),
        ('[dicom]\nallowed_callers = ["A"]\nae_title = ""\n', "dicom.ae_title"),
        ('[dicom]\nallowed_callers = ["A"]\nae_title = "    "\n', "dicom.ae_title"),
        ('[dicom]\nallowed_callers = ["A"]\nae_title = "ÉDGE"\n', "dicom.ae_title"),
        ('[dicom]\nallowed_callers = ["A"]\nbind_address = "localhost"\n', "dicom.bind_address"),
        ('[dicom]\nallowed_callers = ["A"]\nbind_address = "10.0.0.0/8"\n', "dicom.bind_address"),
        ('[dicom]\nallowed_callers = ["A"]\nbind_address = "256.0.0.1"\n', "dicom.bind_address"),
        ('[dicom]\nallowed_callers = ["A"]\nmax_associations = 0\n', "dicom.max_associations"),
        ('[dicom]\nallowed_callers = ["A"]\nmax_associations = 257\n', "dicom.max_associations"),
        ('[dicom]\nallowed_callers = ["A"]\nacse_timeout_s = 0\n', "dicom.acse_timeout_s"),
        ('[dicom]\nallowed_callers = ["A"]\nmax_pdu_bytes = 4095\n', "dicom.max_pdu_bytes"),
        (
            '[dicom]\nallowed_callers = ["A"]\nrequire_called_ae_title = 1\n',
            "dicom.require_called_ae_title",
        ),
        ("[dicom]\nallowed_callers = []\n", "dicom.allowed_callers"),
        ("[dicom]\nallowed_callers = []\nallow_any_caller = false\n", "dicom.allowed_callers"),
        ("[dicom]\nport = 104\n", "dicom.allowed_callers"),
        ('[dicom]\nallowed_callers = ["A"]\n[dicom.tls]\nenabled = true\n', "dicom.tls.cert_file"),
        ('[dicom]\nallowed_callers = ["A"]\n[storage]\nwarm_dir = "hot"\n', "storage.warm_dir"),
        ('[dicom]\nallowed_callers = ["A"]\n[storage]\ncold_dir = "./warm/"\n', "storage.cold_dir"),
        (
            '[dicom]\nallowed_callers = ["A"]\n'
            '[storage]\ndata_dir = "/d"\nquarantine_dir = "/d/hot"\n',
            "storage.quarantine_dir",
        ),
        ('[dicom]\nallowed_callers = ["A"]\n[storage]\nhot_dir = ""\n', "storage.hot_dir"),
        ('[dicom]\nallowed_callers = ["A"]\n[storage]\ndatabase = ""\n', "storage.database"),
        ('[dicom]\nallowed_callers = ["A"]\n[storage]\nmin_free_mb = -1\n', "storage.min_free_mb"),
        (
            '[dicom]\nallowed_callers = ["A"]\n[studies]\nquiet_period_s = 0\n',
            "studies.quiet_period_s",
        ),
        (
            '[dicom]\nallowed_callers = ["A"]\n[studies.quiet_period_by_modality]\nCT = -5\n',
            "studies.quiet_period_by_modality.CT",
        ),
        (
            '[dicom]\nallowed_callers = ["A"]\n[studies]\nquiet_period_by_modality = 5\n',
            "studies.quiet_period_by_modality",
        ),
        (
            '[dicom]\nallowed_callers = ["A"]\n[studies]\ncheck_interval_s = 61\n',
            "studies.check_interval_s",
        ),
        ('[dicom]\nallowed_callers = ["A"]\n[logging]\nlevel = "VERBOSE"\n', "logging.level"),
        ('[dicom]\nallowed_callers = ["A"]\n[logging]\nlevel = 10\n', "logging.level"),
    ],
)
def test_bad_file_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    err = config_error(tmp_path, text)
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    assert err.message


def test_tls_enabled_with_missing_files(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "cert.pem")
    key = write(tmp_path, "key", "key.pem")
    base = '[dicom]\nallowed_callers = ["A"]\n[dicom.tls]\nenabled = true\n'

    err = config_error(tmp_path, base + f'cert_file = "{tmp_path / "nope.pem"}"\n')
    assert err.field == "dicom.tls.cert_file"
    assert "not found" in err.message

    err = config_error(tmp_path, base + f'cert_file = "{cert}"\n')
    assert err.field == "dicom.tls.key_file"
    assert "required" in err.message

    err = config_error(tmp_path, base + f'cert_file = "{cert}"\nkey_file = "{tmp_path}"\n')
    assert err.field == "dicom.tls.key_file"  # a folder is not a key file

    err = config_error(
        tmp_path,
        base + f'cert_file = "{cert}"\nkey_file = "{key}"\nca_file = "{tmp_path / "ca.pem"}"\n',
    )
    assert err.field == "dicom.tls.ca_file"

    cfg = load(tmp_path, base + f'cert_file = "{cert}"\nkey_file = "{key}"\n')
    assert cfg.dicom.tls.enabled is True


def test_tls_disabled_does_not_check_files(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        '[dicom]\nallowed_callers = ["A"]\n[dicom.tls]\ncert_file = "/no/such/cert.pem"\n',
    )
    assert cfg.dicom.tls.enabled is False


def test_tiers_through_a_symlink_are_the_same_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "hot").mkdir(parents=True)
    (data / "warm_link").symlink_to(data / "hot")
    err = config_error(
        tmp_path,
        f'[dicom]\nallowed_callers = ["A"]\n[storage]\ndata_dir = "{data}"\n'
        'warm_dir = "warm_link"\n',
    )
    assert err.field == "storage.warm_dir"
    assert "storage.hot_dir" in err.message


def test_lowercase_log_level_is_accepted(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL + '[logging]\nlevel = "warning"\n')
    assert cfg.logging.level.upper() == "WARNING"


def test_not_toml(tmp_path: Path) -> None:
    err = config_error(tmp_path, "[dicom\nport = = 1\n")
    assert err.field == "config"
    assert "not valid TOML" in err.message


@pytest.mark.parametrize(
    "content",
    [b'[dicom]\nae_title = "\xc9DGE"\n', b"\x00\x01\x89PNG\r\n\x1a\n\xff\xfe"],
    ids=["latin-1", "binary"],
)
def test_not_utf8(tmp_path: Path, content: bytes) -> None:
    # Regression: this used to escape as a bare UnicodeDecodeError (a traceback from the CLI).
    path = tmp_path / "not-utf8.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.field == "config"
    assert "UTF-8" in info.value.message


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_unreadable_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nope.toml" if kind == "missing" else tmp_path
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.field == "config"
    assert "cannot read" in info.value.message
    assert str(path) in info.value.message


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads os.environ: make sure no EDGE_* variable of the caller leaks in."""
    for name in list(os.environ):
        if name.startswith("EDGE_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
def test_cli_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, FULL)
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("configuration OK")
    assert "EDGE_CT on 10.1.2.3:104" in out
    assert "PACS@10.0.0.0/8" in out
    assert err == ""


@pytest.mark.usefixtures("clean_env")
def test_cli_check_config_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[dicom]\nallowed_callers = ["A"]\nport = 70000\n')
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "configuration OK" not in out
    assert "dicom.port" in err
    assert "70000" in err


@pytest.mark.usefixtures("clean_env")
def test_cli_check_config_bad_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, MINIMAL)
    monkeypatch.setenv("EDGE_DICOM_AE_TITEL", "X")
    assert main(["check-config", "--config", str(path)]) == 2
    assert "EDGE_DICOM_AE_TITEL" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
def test_cli_check_config_binary_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "edge-agent.toml"
    path.write_bytes(b"\xff\xd8\xff\xe0 not a config")
    assert main(["check-config", "--config", str(path)]) == 2
    assert "configuration error in config" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
def test_cli_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
def test_cli_init_then_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "site"
    assert main(["init", str(root)]) == 0
    path = root / "edge-agent.toml"
    assert path.is_file()
    capsys.readouterr()

    assert main(["check-config", "--config", str(path)]) == 0
    assert "configuration OK" in capsys.readouterr().out
    cfg = load_config(path, env={})
    assert Path(cfg.storage.data_dir) == root.resolve() / "data"
    assert [c.ae_title for c in cfg.dicom.allowed_callers] == ["STORESCU", "ECHOSCU"]

    before = path.read_text(encoding="utf-8")
    assert main(["init", str(root), "--port", "4242"]) == 1
    assert "--force" in capsys.readouterr().err
    assert path.read_text(encoding="utf-8") == before  # untouched

    assert main(["init", str(root), "--port", "4242", "--force"]) == 0
    assert load_config(path, env={}).dicom.port == 4242


@pytest.mark.usefixtures("clean_env")
def test_cli_init_with_options(tmp_path: Path) -> None:
    root = tmp_path / "site"
    code = main(
        [
            "init",
            str(root),
            "--ae-title",
            "EDGE_MR",
            "--bind-address",
            "127.0.0.1",
            "--allow",
            "PACS@10.0.0.0/8",
            "--allow",
            "MR1",
            "--quiet-period",
            "45",
            "--min-free-mb",
            "0",
        ]
    )
    assert code == 0
    cfg = load_config(root / "edge-agent.toml", env={})
    assert cfg.dicom.ae_title == "EDGE_MR"
    assert cfg.dicom.bind_address == "127.0.0.1"
    assert cfg.dicom.allowed_callers == (
        AllowedCaller(ae_title="PACS", host="10.0.0.0/8"),
        AllowedCaller(ae_title="MR1"),
    )
    assert cfg.studies.quiet_period_s == 45.0
    assert cfg.storage.min_free_mb == 0


def test_ipv4_mapped_peer_matches_ipv4_network() -> None:
    caller = AllowedCaller(ae_title="PACS", host="10.0.0.0/8")
    assert caller.matches("PACS", "::ffff:10.1.2.3")
    assert not caller.matches("PACS", "::ffff:11.1.2.3")


def test_foreign_edge_variables_are_ignored() -> None:
    """Kubernetes injects <SERVICE>_* variables; for a Service named "edge" they start EDGE_."""
    env = {
        "EDGE_PORT": "tcp://10.43.0.7:11112",
        "EDGE_SERVICE_HOST": "10.43.0.7",
        "EDGE_PORT_11112_TCP_ADDR": "10.43.0.7",
        "EDGE_DICOM_ALLOW_ANY_CALLER": "true",
    }
    cfg = load_config(None, env=env)
    assert cfg.dicom.port == 11112 and cfg.dicom.allow_any_caller


@pytest.mark.parametrize(
    ("slots", "per_ip", "expected"), [(16, 0, 12), (4, 0, 3), (2, 0, 2), (1, 0, 1), (16, 5, 5)]
)
def test_associations_per_ip_keeps_a_slot_for_others(
    slots: int, per_ip: int, expected: int
) -> None:
    from edge_agent.config import DicomConfig

    d = DicomConfig(max_associations=slots, max_associations_per_ip=per_ip)
    assert d.associations_per_ip == expected


def test_every_numeric_setting_declares_its_limits_beside_it() -> None:
    """Limits live in one place, next to the default (``setting(...)``), so validation and
    the default cannot drift apart; and every declared limit is enforced by validate()."""
    import typing

    from edge_agent.config import Destination, validate

    numeric = (int, float, tuple[int, ...], typing.Mapping[str, float])

    def walk(cls: type[Any], where: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        missing = []
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                missing += walk(t, f"{where}{f.name}.")  # type: ignore[arg-type]
            elif t in numeric and "bound" not in f.metadata:
                missing.append(where + f.name)
        return missing

    assert walk(Config, "") + walk(Destination, "destination.") == []
    # and each bound is enforced: one past the upper limit of a few is refused by name
    base = Config(dicom=DicomConfig(allowed_callers=(AllowedCaller(ae_title="A"),)))
    for section, name, bad in (
        ("dicom", "max_sequence_depth", 257),
        ("storage", "journal_max_pending_mb", 0),
        ("web", "refresh_s", 0.1),
        ("lifecycle", "hot_low_watermark", 0.0),
    ):
        cfg = dataclasses.replace(
            base, **{section: dataclasses.replace(getattr(base, section), **{name: bad})}
        )
        with pytest.raises(ConfigError) as info:
            validate(cfg)
        assert info.value.field == f"{section}.{name}"
