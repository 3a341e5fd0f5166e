"""The wheel maps the repository's folders into one ``layoutc`` namespace (pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("compiler", "runtime", "tools", "connectors", "grammar", "specs")


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_installed():
    cfg = _config()
    mapped = {v: k for k, v in cfg["package-dir"].items()}
    assert set(cfg["packages"]) == set(cfg["package-dir"])
    for top in FOLDERS:
        for init in (ROOT / top).rglob("__init__.py"):
            folder = init.parent.relative_to(ROOT).as_posix()
            if "__pycache__" in folder:
                continue
            assert folder in mapped, (
                f"{folder}/ is a package but pyproject.toml does not install it"
            )
            expected = "layoutc." + folder.replace("/", ".")
            if folder == "compiler/pkg":
                expected = "layoutc"
            assert mapped[folder] == expected


def test_data_files_and_type_marker_ship():
    data = _config()["package-data"]
    assert "py.typed" in data["layoutc"]
    assert (ROOT / "compiler" / "pkg" / "py.typed").is_file()
    assert "*.lark" in data["layoutc.grammar"]
    assert "*.layout" in data["layoutc.specs"]
