"""The policy (a Qwen2.5-VL checkpoint) outside verl: loading it and building its inputs as verl does."""
