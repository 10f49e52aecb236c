"""A run's console: verl's config dump goes to a file, engine warnings print once per run.

verl_grto/patches.py (``_config_dump_to_file``) and verl_grto/console.py say why."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import verl  # noqa: F401  (loads the plugin, which applies the patches)
import yaml

from verl_grto import patches

CONFIG = {"trainer": {"default_local_dir": None, "total_training_steps": 32}, "data": {"train_batch_size": 8}}


def _call_as_verl_task_runner(obj: dict, site_packages: Path) -> None:
    """Run ``pprint(obj)`` from a function ``run`` whose code says it lives in verl/trainer/main_ppo.py,
    the way ``TaskRunnerV1.run`` calls it (main_ppo.py:144)."""
    fake_file = str(site_packages / "verl" / "trainer" / "main_ppo.py")
    source = "from pprint import pprint\ndef run(config):\n    pprint(config)\n"
    namespace: dict = {}
    exec(compile(source, fake_file, "exec"), namespace)
    namespace["run"](obj)


def test_verl_main_ppo_binds_the_patched_pprint():
    """The patch works only if main_ppo's ``from pprint import pprint`` runs after the plugin loaded."""
    import verl.trainer.main_ppo as main_ppo

    assert main_ppo.pprint is patches.pprint_config_to_file
    assert any("resolved config to a file" in name for name in patches.applied())


def test_task_runner_config_dump_is_written_to_a_file_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VERL_GRTO_VERBOSE", raising=False)
    config = {**CONFIG, "trainer": {**CONFIG["trainer"], "default_local_dir": str(tmp_path / "runs" / "exp")}}
    _call_as_verl_task_runner(config, tmp_path)
    out = capsys.readouterr().out
    written = tmp_path / "runs" / "exp" / patches.RESOLVED_CONFIG_NAME
    assert out.splitlines() == [out.strip()]  # one line
    assert str(written) in out and "VERL_GRTO_VERBOSE=1" in out
    assert yaml.safe_load(written.read_text()) == config
    assert not [p for p in written.parent.iterdir() if p.name != written.name]  # no temporary left


def test_verbose_and_other_callers_get_the_standard_pprint(tmp_path, capsys, monkeypatch):
    from pprint import pformat, pprint

    config = {**CONFIG, "trainer": {**CONFIG["trainer"], "default_local_dir": str(tmp_path / "runs")}}
    pprint(config)  # not verl's task runner
    assert capsys.readouterr().out == pformat(config) + "\n"
    monkeypatch.setenv("VERL_GRTO_VERBOSE", "1")
    _call_as_verl_task_runner(config, tmp_path)
    assert capsys.readouterr().out == pformat(config) + "\n"
    monkeypatch.delenv("VERL_GRTO_VERBOSE")
    _call_as_verl_task_runner({"not": "a config"}, tmp_path)  # not a config dict
    assert capsys.readouterr().out == pformat({"not": "a config"}) + "\n"
    assert not (tmp_path / "runs").exists()


def _engine_warnings(env_extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_RAYLET_PID", "VERL_GRTO_VERBOSE")}
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import verl, verl.workers.engine; import warnings; "
         "warnings.warn('another warning still shows', UserWarning)"],
        env={**env, **env_extra}, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return [line for line in proc.stderr.splitlines() if "UserWarning" in line]


def test_engine_warnings_print_in_the_driver_and_not_in_ray_workers():
    driver = _engine_warnings({})
    assert sum("engine is not available" in line for line in driver) >= 3
    worker = _engine_warnings({"RAY_RAYLET_PID": "1"})
    assert not [line for line in worker if "engine is not available" in line]
    assert any("another warning still shows" in line for line in worker)


def test_verbose_keeps_every_warning_in_ray_workers(monkeypatch):
    """``VERL_GRTO_VERBOSE=1`` in a worker: no filter is installed (the fresh-process test above shows
    the filter, when installed, is in place before verl's engine module warns)."""
    from verl_grto import console

    monkeypatch.setenv("RAY_RAYLET_PID", "1")
    monkeypatch.setenv("VERL_GRTO_VERBOSE", "1")
    with warnings.catch_warnings():
        before = list(warnings.filters)
        assert console.quiet_ray_workers() is False and warnings.filters == before
    monkeypatch.delenv("VERL_GRTO_VERBOSE")
    with warnings.catch_warnings():
        assert console.quiet_ray_workers() is True
        assert warnings.filters[0][1].pattern == console.ENGINE_UNAVAILABLE
