"""verl loads the plugin through its entry point, and a missing plugin is loud."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from verl_grto import doctor

REPO = Path(__file__).resolve().parents[1]


def test_doctor_passes_in_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "verl_grto.cli", "doctor"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: everything verl-grto registers is visible to verl" in proc.stdout
    assert "hf" in proc.stdout and "cpu" in proc.stdout


def test_doctor_reports_what_is_missing():
    found = {"plugin_loaded": True, **{k: list(v) for k, v in doctor.EXPECTED.items()}}
    assert doctor.missing(found) == []
    found["rollout"] = ["vllm"]
    found["plugin_loaded"] = False
    gaps = doctor.missing(found)
    assert "rollout: hf" in gaps and any(g.startswith("plugin:") for g in gaps)


def test_doctor_flags_an_installed_but_broken_extra(monkeypatch):
    monkeypatch.setitem(doctor.EXTRAS, "fake", ("json", ["json", "verl_grto._no_such_module"]))
    monkeypatch.setitem(doctor.EXTRAS, "absent", ("_no_such_package_xyz", ["_no_such_package_xyz"]))
    state = doctor.inspect_extras()
    assert state["fake"].startswith("broken:") and "_no_such_module" in state["fake"]
    assert state["absent"] == "not installed"
    found = {"plugin_loaded": True, **{k: list(v) for k, v in doctor.EXPECTED.items()}, "extras": state}
    assert doctor.missing(found) == [f"extra fake: {state['fake']}"]


def test_doctor_fails_when_verl_skips_the_plugin(monkeypatch, capsys):
    # run_doctor inspects a fresh interpreter, which inherits this variable; the CLI entry itself is
    # test_doctor_passes_in_fresh_process (one CLI start-up of ~8 s is enough)
    monkeypatch.setenv("VERL_USE_EXTERNAL_PLUGINS", "none")
    assert doctor.run_doctor() == 1
    err = capsys.readouterr().err
    assert "MISSING" in err and "platform: cpu" in err


def test_recipe_fails_at_start_without_plugin(tmp_path):
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"}
    proc = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", "recipes", "--config-name", "grpo_tiny_cpu"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "verl-grto recipes need the verl-grto plugin" in proc.stdout + proc.stderr


def test_relative_config_path_is_reanchored_on_cwd(tmp_path):
    from hydra_plugins.verl_grto_searchpath import reanchor_missing_primary

    (tmp_path / "recipes").mkdir()
    module_dir = tmp_path / "site" / "verl" / "trainer"
    module_dir.mkdir(parents=True)
    missing = str(module_dir / "recipes")
    assert reanchor_missing_primary(missing, str(tmp_path), [str(module_dir)]) == str(tmp_path / "recipes")
    (module_dir / "recipes").mkdir()
    assert reanchor_missing_primary(missing, str(tmp_path), [str(module_dir)]) is None  # exists: untouched
