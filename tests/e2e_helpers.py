"""The end-to-end tests' view of verl_grto.trainer.launch."""

from verl_grto.trainer.launch import read_metrics, run_main_ppo

__all__ = ["read_metrics", "run_main_ppo"]
