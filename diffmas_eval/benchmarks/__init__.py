"""Benchmarks behind the mas_* lm-eval tasks: data sources (`sources`), answer extraction (`extract`), scoring
(`scoring`) and evalplus code execution in a kernel-level sandbox (`code_exec`, `sandbox`)."""
