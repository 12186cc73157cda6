"""What users run besides prepare(): the console script, compare, fit, the demo, presets, tiny models, the peft-patched
runner."""
